"""LightningModule for causal-LM fine-tuning of any HF model (dense, decomposed, PEFT-wrapped).

It trains exactly the parameters with requires_grad=True (the adapter layer decides which), so it does not
depend on the adapter kind. Checkpoints keep only those trainable tensors (see `deftlab.train.trainer` for the
safetensors checkpoint format); the frozen base is rebuilt from the model config, never from a checkpoint.
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from deftlab.errors import DeftlabError
from deftlab.tasks.encoding import IGNORE_INDEX
from deftlab.train.memory import peak_memory_bytes
from deftlab.train.strategies import clean_name

SCHEDULES = ("linear", "cosine", "constant")


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over positions whose label is not -100; returns (loss, #target tokens).

    logits[:, t] predicts labels[:, t + 1]. Computed in fp32 whatever the logits' dtype.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE_INDEX).sum())
    if n == 0:
        raise DeftlabError("a training batch has no response tokens (all labels are -100)",
                           "raise cutoff_len or check the task's examples")
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / n, n


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "linear",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (HF convention: linear warmup from 0)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise DeftlabError(f"unknown lr schedule '{schedule}'", f"use one of {', '.join(SCHEDULES)}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


# GaLore (Zhao et al. 2024) projection settings: the galore-torch README's LLaMA pre-training defaults
GALORE = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
# bitsandbytes' AdamW variants (QLoRA's recipe uses paged_adamw): paged states move to the CPU under memory pressure
# (on CUDA; on CPU bitsandbytes falls back to unpaged), 8-bit states take 2 bytes per parameter instead of 8
BNB_OPTIMIZERS = {"paged_adamw": "PagedAdamW", "adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
OPTIMIZERS = ("adamw", "galore", *BNB_OPTIMIZERS)


def make_optimizer(name: str, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW (torch) or one of bitsandbytes' BNB_OPTIMIZERS over `params` (GaLore groups its own: `_galore`)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name not in BNB_OPTIMIZERS:
        raise DeftlabError(f"unknown optimizer '{name}'", f"use one of {', '.join(OPTIMIZERS)}")
    import bitsandbytes as bnb

    return getattr(bnb.optim, BNB_OPTIMIZERS[name])(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class DeftLightningModule(pl.LightningModule):
    """Causal-LM loss on the masked labels; AdamW (or GaLore's AdamW) over the requires_grad parameters only."""

    def __init__(self, model: torch.nn.Module, *, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, schedule: str = "linear",
                 min_lr_ratio: float = 0.0, total_steps: int | None = None, optimizer: str = "adamw"):
        super().__init__()
        if schedule not in SCHEDULES:
            raise DeftlabError(f"unknown lr schedule '{schedule}'", f"use one of {', '.join(SCHEDULES)}")
        if optimizer not in OPTIMIZERS:
            raise DeftlabError(f"unknown optimizer '{optimizer}'", f"use one of {', '.join(OPTIMIZERS)}")
        self.optimizer_name = optimizer
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.warmup_steps, self.schedule, self.min_lr_ratio = warmup_steps, schedule, min_lr_ratio
        self.total_steps = total_steps
        self.strict_loading = False  # checkpoints hold only the trainable tensors; on_load_checkpoint checks them
        self.stats = {"losses": [], "tokens": 0, "supervised_tokens": 0, "seconds": 0.0, "resumed_from_step": None}
        self._t_last: float | None = None

    # --- parameters --------------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        # clean_name: under FSDP the names carry wrapper parts that the (full) checkpoint's names do not
        return [clean_name(n) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise DeftlabError("the model has no trainable parameters",
                               "attach an adapter (deftlab.adapters.attach) or unfreeze some weights")
        if self.optimizer_name == "galore":
            opt = self._galore(params)
        else:
            opt = make_optimizer(self.optimizer_name, params, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay)
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
            s, warmup_steps=self.warmup_steps, total_steps=total, schedule=self.schedule,
            min_lr_ratio=self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _galore(self, params: list[torch.nn.Parameter]):
        """GaLoreAdamW: gradients of the decoder blocks' weight matrices are projected to GALORE["rank"]; every
        other trainable parameter (embeddings, norms, head) takes plain AdamW steps, as in GaLore's scripts."""
        try:
            from galore_torch import GaLoreAdamW
        except ImportError as e:
            raise DeftlabError(f"optimizer 'galore' needs the galore-torch package ({e})",
                               "pip install 'deftlab[galore]' (or galore-torch)") from None
        matrices = [p for n, p in self.named_parameters() if p.requires_grad and p.ndim == 2 and ".layers." in n]
        ids = {id(p) for p in matrices}
        rest = [p for p in params if id(p) not in ids]
        if not matrices:
            raise DeftlabError("optimizer 'galore' found no trainable weight matrix in the decoder blocks",
                               "use adapter 'full' (GaLore trains full weights) or optimizer 'adamw'")
        groups = ([{"params": rest}] if rest else []) + [{"params": matrices, **GALORE}]
        return GaLoreAdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    # --- training ----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss, n_target = masked_lm_loss(logits, batch["labels"])
        if not torch.isfinite(loss):
            raise DeftlabError(f"non-finite training loss at step {self.global_step}",
                               "lower the learning rate or use fp32/bf16 instead of fp16")
        value, tokens = loss.detach(), batch["attention_mask"].sum().float()
        if self.trainer.world_size > 1:  # the statistics of the whole step, not of this process's share
            reduce = self.trainer.strategy.reduce
            value, tokens = reduce(value, reduce_op="mean"), reduce(tokens, reduce_op="sum")
            n_target = int(reduce(torch.tensor(float(n_target), device=value.device), reduce_op="sum"))
        self.stats["losses"].append(float(value))
        self.stats["tokens"] += int(tokens)
        self.stats["supervised_tokens"] += n_target
        # value: this micro-batch's loss averaged over the ranks (only rank 0's loggers write it)
        self.log("train/loss", value, on_step=True, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def on_fit_start(self) -> None:
        # HF loaders hand back models in eval mode; train mode turns the adapters' dropout on (as HF Trainer does)
        self.model.train()

    def on_train_start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t_last = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            self.stats["seconds"] += now - self._t_last
        self._t_last = now
        if self.stats["seconds"] > 0:
            self.log("train/tokens_per_s", self.stats["tokens"] / self.stats["seconds"], on_step=True)
        peak = peak_memory_bytes(self.device)[0]
        self.stats["peak_memory_bytes"] = max(peak, self.stats.get("peak_memory_bytes") or 0)
        self.log("train/peak_memory_mb", peak / 2**20, on_step=True)
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None:
            self.log("train/lr", opt.param_groups[0]["lr"], on_step=True)

    def training_summary(self) -> dict:
        """Loss, throughput and memory over the whole run (resumed runs included)."""
        losses = self.stats["losses"]
        k = max(1, min(len(losses) // 5, 20))
        peak, kind = peak_memory_bytes(self.device)
        peak = max(peak, self.stats.get("peak_memory_bytes") or 0)  # a spawned rank 0's, carried back
        secs = self.stats["seconds"]
        return {
            "global_step": int(self.stats.get("global_step") or self.global_step),
            "micro_batches": len(losses),
            "initial_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-k:]) / k if losses else None,  # mean of the last k micro-batches
            "train_tokens": self.stats["tokens"],
            "supervised_tokens": self.stats["supervised_tokens"],
            "train_seconds": secs,
            "tokens_per_s": self.stats["tokens"] / secs if secs > 0 else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "resumed_from_step": self.stats["resumed_from_step"],
        }

    # --- checkpoints: only trainable tensors ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["deftlab_stats"] = dict(self.stats, losses=list(self.stats["losses"]))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, expected = set(checkpoint["state_dict"]), set(self.trainable_names())
        if saved != expected:
            missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
            raise DeftlabError(
                f"checkpoint's trainable tensors do not match the model (missing {missing}, unexpected {extra})",
                "resume with the same adapter config, or use a new run directory")
        stats = checkpoint.get("deftlab_stats")
        if stats:
            self.stats.update(stats)
        self.stats["resumed_from_step"] = int(checkpoint.get("global_step", 0))
