"""Training profiles (configs/profiles/*.yaml): the training and evaluation hyper-parameters of a fine-tuning run,
typed and validated.

A run names its profile with the `profile` param; the run's own lr, lora_r, seed, ... override single fields.
(An experiment's *preset* — smoke, cpu-small, gpu, paper — is a different thing: it picks the model, data subsets
and the profile of every run of a table.) `paper` is the DeFT appendix setting; `gpu` runs SmolLM2-135M at those
settings; `cpu-small` fits one run into about 15 minutes on a 2-core CPU; `smoke` is a few steps on the tiny
model for CI. The parsed content of the profile file is part of the run key (`profile_fingerprint`), so editing a
profile makes its runs missing instead of silently stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deftlab.config import ConfigError, from_dict, load_yaml
from deftlab.errors import UnknownNameError
from deftlab.paths import configs_dir
from deftlab.store.keys import short_digest

Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"]
Schedule = Literal["linear", "cosine", "constant"]
# ddp: every process runs the command (torchrun, or Lightning re-runs it); ddp_spawn/ddp_fork: this process starts
# the others; fsdp: sharded full fine-tuning (deftlab.train.strategies); deepspeed: ZeRO stage 2, when installed
Strategy = Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed"]
FsdpSharding = Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"]


@dataclass
class TrainProfile:
    name: str = "custom"
    description: str = ""
    model: str | None = None  # model config name the profile is meant for (informational; runs may override)
    # optimisation: AdamW(betas) over the trainable parameters
    lr: float = 3e-4
    lr_grid: list[float] = field(default_factory=list)  # the paper's search grid, for sweeps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: Schedule = "linear"
    min_lr_ratio: float = 0.0
    gradient_clip_val: float | None = None
    batch_size: int = 16  # effective batch (micro_batch_size × gradient accumulation)
    micro_batch_size: int = 4
    epochs: int = 3
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides epochs)
    cutoff_len: int = 256
    # adapter
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # q,k,v,gate,up,down reproduces DeFT's printed #Trainable at r=32 (72M LLaMA-7B, 112M LLaMA-2 13B, 357M
    # LLaMA-65B; tests/unit/test_paper_params.py); the paper does not list its targets
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    # data
    train_limit: int | None = None  # training subset size (None: all)
    eval_limit: int | None = None  # first N problems of each test set (None: all)
    eval_sets: list[str] | None = None  # None: the task's default sets
    # generation
    max_new_tokens: int | None = None  # None: the task's default (arith 256)
    eval_batch_size: int = 16
    num_beams: int = 1  # 1: greedy; LLM-Adapters' evaluation (cited by DeFT) uses 4-beam search
    answer_nll: bool = True  # also the teacher-forced NLL of each test set's reference answers (held-out loss)
    ppl_train_heldout: bool = True  # also PPL(Train) on training examples not trained on (recipes.finetune)
    # runtime
    precision: Precision = "auto"  # auto: bf16-mixed on a bf16-capable GPU, 32-true otherwise
    # recompute each decoder layer in backward instead of keeping its activations (HF, non-reentrant): every layer
    # then keeps only its input; `deftlab plan` shows what it saves
    gradient_checkpointing: bool = False
    # data-parallel training (Lightning): devices per node × num_nodes processes share each optimizer step's
    # batch_size. strategy "auto": ddp under torchrun, else ddp_spawn when there is more than one process. Under
    # torchrun every process runs the command; rank 0 alone records, evaluates and logs (deftlab.train.distributed)
    devices: int = 1
    num_nodes: int = 1
    strategy: Strategy = "auto"
    # fsdp only (full fine-tuning): how parameters, gradients and optimizer states are sharded, and whether the
    # shards live in CPU memory between uses (slower; lets 13B full FT fit fewer GPUs)
    fsdp_sharding: FsdpSharding = "FULL_SHARD"
    fsdp_cpu_offload: bool = False
    seed: int = 42
    save_every_n_steps: int = 50
    log_every_n_steps: int = 10

    def validate(self) -> None:
        def positive(name):
            if getattr(self, name) <= 0:
                raise ConfigError(f"profile '{self.name}': {name} must be positive, got {getattr(self, name)}")

        for n in ("lr", "batch_size", "micro_batch_size", "epochs", "cutoff_len", "lora_r", "lora_alpha",
                  "eval_batch_size", "num_beams", "save_every_n_steps", "log_every_n_steps", "devices", "num_nodes"):
            positive(n)
        per_step = self.micro_batch_size * self.world_size
        if self.batch_size % per_step:
            raise ConfigError(f"profile '{self.name}': batch_size {self.batch_size} is not a multiple of "
                              f"micro_batch_size × devices × num_nodes = {per_step}", "make it a multiple")
        if self.strategy in ("ddp_spawn", "ddp_fork") and self.num_nodes > 1:
            raise ConfigError(f"profile '{self.name}': strategy {self.strategy} starts processes on this machine "
                              f"only (num_nodes {self.num_nodes})", "use strategy ddp, launched by torchrun on "
                              "every node")
        if self.strategy == "deepspeed":
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError(f"profile '{self.name}': strategy deepspeed needs the deepspeed package, which "
                                  "is not installed", "pip install deepspeed, or use strategy ddp (adapters) or "
                                  "fsdp (full fine-tuning)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"profile '{self.name}': betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"profile '{self.name}': lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"profile '{self.name}': min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"profile '{self.name}': warmup_steps must be >= 0, got {self.warmup_steps}")
        for n in ("train_limit", "eval_limit", "max_new_tokens"):
            v = getattr(self, n)
            if v is not None and v <= 0:
                raise ConfigError(f"profile '{self.name}': {n} must be positive or null, got {v}")

    def adapter_kwargs(self) -> dict:
        """LoRA options for `deftlab.adapters.AdapterConfig(kind=..., **profile.adapter_kwargs())`."""
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": tuple(self.lora_target_modules)}

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def accumulate_grad_batches(self) -> int:
        """Micro-batches each process accumulates per optimizer step (the processes together make batch_size)."""
        return self.batch_size // (self.micro_batch_size * self.world_size)


def profiles_dir() -> Path:
    return configs_dir() / "profiles"


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike, **overrides) -> TrainProfile:
    """A profile by name (configs/profiles/<name>.yaml) or YAML path, with optional field overrides."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = profiles_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UnknownNameError("training profile", str(name_or_path), profile_names())
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    data.update(overrides)
    return from_dict(TrainProfile, data, where=f"profile {path.name}")


def profile_fingerprint(params: dict) -> dict:
    """{"profile": "<name>:<hash of the parsed profile file>"} for a run that names a training profile."""
    name = params.get("profile")
    if not isinstance(name, str):
        return {}
    path = profiles_dir() / f"{name}.yaml"
    if not path.is_file():
        return {}
    return {"profile": f"{name}:{short_digest(load_yaml(path))}"}


def resolve_precision(precision: str) -> str:
    """'auto' → 'bf16-mixed' on a bf16-capable CUDA GPU, else '32-true'."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"
