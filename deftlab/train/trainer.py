"""Build the pl.Trainer and run a fine-tune: checkpoints of the trainable tensors only, automatic resume.

Checkpoint layout under <run_dir>/checkpoints/: `last.ckpt` holds the training state (optimizer moments of the
trainable parameters, loop progress, data position, lr scheduler, run statistics) and names its weights file,
`last-weights-step<N>.safetensors`, which holds only the trainable tensors. The weights are written first and the
.ckpt (atomically) second, so a crash never pairs a .ckpt with missing weights. A 135M model's frozen base is
never copied into a checkpoint.

`fit` resumes from `last.ckpt` when the run directory has one, so re-running an interrupted command continues at
the saved step with the same data order; re-running a finished one returns at once.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from safetensors.torch import load_file, save_file

from deftlab.config import to_dict
from deftlab.errors import CacheCorruptError, DeftlabError
from deftlab.manifest import write_json_atomic
from deftlab.train.datamodule import TaskDataModule
from deftlab.train.distributed import SPAWNING, is_global_zero
from deftlab.train.loggers import finish_loggers, make_loggers
from deftlab.train.module import DeftLightningModule
from deftlab.train.profiles import TrainProfile, resolve_precision
from deftlab.train.strategies import make_strategy, strategy_name, unshard_to_rank0

CKPT_DIR = "checkpoints"
LAST = "last.ckpt"
WEIGHTS_KEY = "deftlab_weights_file"
FINAL_WEIGHTS = "trainable.safetensors"
TRAIN_STATS = "train_stats.json"


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    """safetensors file via temp + rename. Tensors are cloned to CPU: safetensors refuses shared storage."""
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


class TrainableSafetensorsIO(TorchCheckpointIO):
    """Writes checkpoint["state_dict"] (already reduced to trainable tensors) to safetensors beside the .ckpt."""

    @staticmethod
    def _weights_glob(path: Path) -> list[Path]:
        return sorted(path.parent.glob(f"{path.stem}-weights-step*.safetensors"))

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = checkpoint.pop("state_dict", {})
        name = f"{path.stem}-weights-step{int(checkpoint.get('global_step', 0)):08d}.safetensors"
        save_safetensors_atomic(weights, path.parent / name, {"global_step": str(checkpoint.get("global_step", 0))})
        checkpoint[WEIGHTS_KEY] = name
        try:
            super().save_checkpoint(checkpoint, path, storage_options)  # atomic (temp file + rename)
        finally:
            checkpoint["state_dict"] = weights
        for old in self._weights_glob(path):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        path = Path(path)
        ckpt = super().load_checkpoint(path, map_location=map_location, weights_only=False)
        name = ckpt.get(WEIGHTS_KEY)
        if name is None:  # a plain Lightning checkpoint
            return ckpt
        wpath = path.parent / name
        if not wpath.is_file():
            raise CacheCorruptError(f"checkpoint {path} names missing weights file {name}",
                                    f"delete {path.parent} to restart the run")
        ckpt["state_dict"] = load_file(str(wpath), device="cpu")
        return ckpt

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        for w in self._weights_glob(path):
            w.unlink(missing_ok=True)
        super().remove_checkpoint(path)


class SaveOnTrainEnd(Callback):
    """Also checkpoint the final step, so re-running a finished run restores it instead of retraining."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(str(self.path), weights_only=False)


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    p = Path(run_dir) / CKPT_DIR / LAST
    return p if p.is_file() else None


def build_trainer(preset: TrainProfile, run_dir: str | os.PathLike, *, loggers: list | bool = False,
                  callbacks: list | None = None, progress: bool = True, accelerator: str = "auto",
                  model: torch.nn.Module | None = None, optimizer: str = "adamw") -> pl.Trainer:
    """pl.Trainer with the preset's devices, strategy, precision, accumulation and step/epoch limits (`model`:
    the model to train, which strategy fsdp needs to find its decoder layers)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CKPT_DIR
    # save_top_k=0 + save_last: only last.ckpt, rewritten every `save_every_n_steps` optimizer steps
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=0, save_last=True,
                           every_n_train_steps=preset.save_every_n_steps, save_on_train_epoch_end=False,
                           enable_version_counter=False)
    cbs = [ckpt, SaveOnTrainEnd(ckpt_dir / LAST)]
    if progress:
        cbs.append(TQDMProgressBar(refresh_rate=1))
    cbs.extend(callbacks or [])
    step_based = preset.max_steps > 0
    return pl.Trainer(
        accelerator=accelerator,
        devices=preset.devices,
        num_nodes=preset.num_nodes,
        strategy=make_strategy(preset, model, optimizer),
        precision=resolve_precision(preset.precision),
        max_epochs=-1 if step_based else preset.epochs,
        max_steps=preset.max_steps if step_based else -1,
        accumulate_grad_batches=preset.accumulate_grad_batches,
        gradient_clip_val=preset.gradient_clip_val,
        logger=loggers,
        callbacks=cbs,
        plugins=[TrainableSafetensorsIO()],
        default_root_dir=str(run_dir),
        log_every_n_steps=preset.log_every_n_steps,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # our batch sampler owns the (resumable) order and each rank's share
    )


def _recover_from_spawned(module: DeftLightningModule, run_dir: Path) -> None:
    """After spawned processes trained, this process's module takes rank 0's final trainable tensors and
    statistics from the checkpoint it wrote at the end (SaveOnTrainEnd)."""
    path = last_checkpoint(run_dir)
    if path is None:
        raise DeftlabError(f"the training processes left no final checkpoint in {run_dir / CKPT_DIR}",
                           "check the processes' errors above, then rerun")
    ckpt = TrainableSafetensorsIO().load_checkpoint(path)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    resumed = module.stats.get("resumed_from_step")
    module.on_load_checkpoint(ckpt)  # also checks the tensor names and restores the statistics
    module.stats["resumed_from_step"] = resumed
    module.stats["global_step"] = int(ckpt.get("global_step", 0))


def strategy_of(preset: TrainProfile) -> str:
    """Lightning's strategy name: "auto" for one process; for several, ddp under torchrun, else ddp_spawn (records
    stay in this process)."""
    return strategy_name(preset)


def loss_curve(losses: list[float], accumulate: int) -> list[float]:
    """Per optimizer step: the mean of its micro-batches' losses (each already averaged over the ranks)."""
    return [sum(losses[i:i + accumulate]) / len(losses[i:i + accumulate]) for i in range(0, len(losses), accumulate)]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's requires_grad tensors by parameter name (shared/tied tensors once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """HF's per-decoder-layer activation checkpointing, non-reentrant (it needs no input that requires grad, and
    works with frozen bases); the embeddings' output is made to require grad as PEFT does for k-bit training, so
    adapters inside checkpointed layers always get gradients."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise DeftlabError(f"{type(base).__name__} does not support gradient checkpointing",
                           "set gradient_checkpointing: false in the training profile")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def fit(model: torch.nn.Module, tokenizer, task, preset: TrainProfile, run_dir: str | os.PathLike, *,
        datamodule: TaskDataModule | None = None, loggers: list | bool | str = "auto",
        wandb_mode: str | None = None, callbacks: list | None = None, resume: bool = True, progress: bool = True,
        accelerator: str = "auto", optimizer: str = "adamw") -> dict:
    """Fine-tune `model`'s trainable parameters on `task` with `preset`; return training statistics.

    optimizer: "adamw", "galore" (GaLoreAdamW from galore-torch; deftlab.train.module.GALORE), or one of
    bitsandbytes' "paged_adamw", "adamw_8bit", "paged_adamw_8bit".

    Writes <run_dir>/checkpoints/, <run_dir>/trainable.safetensors (final trainable tensors, names as in
    `model.named_parameters()`) and <run_dir>/train_stats.json. The model is trained in place and returned to
    eval mode. `loggers="auto"`: W&B (offline unless `wandb_mode`/WANDB_MODE say otherwise) + CSV under run_dir;
    False: no logging; or a list of Lightning loggers.

    Several processes (profile devices × num_nodes > 1): spawned ones hand rank 0's trained tensors back to this
    process; under torchrun every process calls fit, and only rank 0 logs and writes the files above (the others
    return their statistics, with "global_rank" > 0). After fsdp, rank 0's model is unsharded (unshard_to_rank0).
    Statistics hold "loss_curve": each optimizer step's mean loss over its micro-batches and processes.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if loggers == "auto" and not is_global_zero():
        loggers = False  # W&B and CSV logs once, from rank 0 of a torchrun launch
    own_loggers = loggers == "auto"
    if own_loggers:
        loggers = make_loggers(run_dir, run_name=run_dir.name, wandb_mode=wandb_mode,
                               config={"preset": to_dict(preset), "task": task.describe()})
    pl.seed_everything(preset.seed, workers=True, verbose=False)
    strategy = strategy_of(preset)
    if preset.gradient_checkpointing and strategy != "fsdp":  # FSDP checkpoints its own layer units
        enable_gradient_checkpointing(model)
    dm = datamodule or TaskDataModule(task, tokenizer, cutoff_len=preset.cutoff_len,
                                      micro_batch_size=preset.micro_batch_size, limit=preset.train_limit,
                                      seed=preset.seed)
    module = DeftLightningModule(model, lr=preset.lr, betas=tuple(preset.betas), weight_decay=preset.weight_decay,
                                 warmup_steps=preset.warmup_steps, schedule=preset.schedule,
                                 min_lr_ratio=preset.min_lr_ratio, optimizer=optimizer)
    trainer = build_trainer(preset, run_dir, loggers=loggers, callbacks=callbacks, progress=progress,
                            accelerator=accelerator, model=model, optimizer=optimizer)
    ckpt_path = last_checkpoint(run_dir) if resume else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # single-process data loading is deliberate (tokenised in memory); Lightning warns about it
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # our DataModule restores the data position itself (state_dict/load_state_dict), which Lightning misses
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        # bitsandbytes' paged optimizers on CPU fall back to unpaged states (module.BNB_OPTIMIZERS says so)
        warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers are not supported on CPU.*")
        status = "failed"
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
            status = "success"
        finally:
            if own_loggers:
                finish_loggers(loggers, status)
    if strategy in SPAWNING:
        _recover_from_spawned(module, run_dir)
    elif strategy == "fsdp":
        unshard_to_rank0(module, trainer)
    model.eval()
    stats = module.training_summary()
    stats.update({
        "wall_seconds": time.perf_counter() - t0,
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "precision": resolve_precision(preset.precision),
        "accumulate_grad_batches": preset.accumulate_grad_batches,
        "world_size": preset.world_size,
        "strategy": strategy,
        "global_rank": trainer.global_rank,
        "loss_curve": loss_curve(module.stats["losses"], preset.accumulate_grad_batches),
        "data": dm.stats,
        "preset": to_dict(preset),
        "task": task.name,
    })
    if trainer.global_rank != 0:  # a launched process other than rank 0: trained; rank 0 writes the files
        return stats
    save_safetensors_atomic(trainable_state(model), run_dir / FINAL_WEIGHTS, {"global_step": str(stats["global_step"])})
    write_json_atomic(run_dir / TRAIN_STATS, stats)
    return stats
