"""Lightning strategies for a training profile: ddp (spawned or launched), FSDP for full fine-tuning, DeepSpeed.

FSDP (strategy "fsdp") is for full fine-tuning of 7B–13B models (the papers' Full FT rows), where one replica's
fp32 weights, gradients and AdamW moments (16 bytes per parameter: 208 GB at 13B) do not fit one GPU:
- each HF decoder layer (the model's `_no_split_modules` class) is its own FSDP unit, the rest is the root unit;
- mixed precision comes from the profile's precision (bf16-mixed: bf16 compute and gradient reduction over fp32
  sharded master weights; load the model in float32);
- gradient_checkpointing checkpoints the same decoder layers through FSDP (not HF's own, which would recompute
  twice);
- checkpoints hold the full (unsharded) state dict, gathered on rank 0, in the trainable-tensor safetensors
  format of `deftlab.train.trainer`, so resume and `load_finetuned` read them like any other run's;
- after training, rank 0's model is unwrapped and takes the full trained weights, so evaluation runs there
  unchanged (`unshard_to_rank0`).
FSDP requires every parameter to be trainable (adapter "full"): adapters (LoRA, ...) train a few tensors of a
frozen base, which DDP replicates cheaply, and their trainable-only checkpoints would leave rank 0 without the
sharded frozen base after training. On CPU (tests) the FSDP units are placed on the CPU with gloo.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import FSDPStrategy

from deftlab.errors import DeftlabError
from deftlab.train.distributed import SPAWNING, launched_externally, launched_world_size
from deftlab.train.profiles import TrainProfile

# wrapper attributes FSDP and activation checkpointing insert into parameter names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without FSDP / activation-checkpointing wrapper parts (as in the model's state_dict)."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def strategy_name(preset: TrainProfile) -> str:
    """The Lightning strategy name: "auto" is ddp under torchrun, ddp_spawn for several spawned processes."""
    if preset.strategy == "auto":
        if preset.world_size == 1:
            return "auto"
        return "ddp" if launched_externally() else "ddp_spawn"
    return preset.strategy


def check_launch(preset: TrainProfile) -> None:
    """Under torchrun the profile's devices × num_nodes must be torchrun's world size (Lightning checks it with a
    less helpful message), and a spawning strategy would start processes inside each launched one."""
    world = launched_world_size()
    if world is None:
        return
    if world != preset.world_size:
        raise DeftlabError(f"torchrun started {world} processes but the profile asks for devices × num_nodes = "
                           f"{preset.devices} × {preset.num_nodes}",
                           "pass --devices (processes per node) and --num-nodes matching torchrun's")
    if preset.strategy in SPAWNING:
        raise DeftlabError(f"strategy {preset.strategy} spawns its own processes, but torchrun already did",
                           "use strategy ddp (or auto) under torchrun")


def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The HF decoder layer class(es) of `model` (its `_no_split_modules`): FSDP's wrap and checkpoint units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise DeftlabError(f"{type(base).__name__} names no decoder layer class for FSDP to wrap "
                           "(_no_split_modules)", "use strategy ddp")
    return classes


def check_fsdp_model(model: torch.nn.Module, optimizer: str) -> None:
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if frozen:
        raise DeftlabError(f"strategy fsdp shards full fine-tuning, but {frozen:,} parameters are frozen (an "
                           "adapter run)", "use strategy ddp for adapters, or --adapter full with fsdp")
    if optimizer != "adamw":
        raise DeftlabError(f"optimizer '{optimizer}' with strategy fsdp: it needs whole weight matrices, FSDP "
                           "hands it flat shards", "use optimizer adamw with fsdp, or strategy ddp")


class DeftFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy that also runs on CPU (gloo; tests) and resumes from deftlab's safetensors
    checkpoints (Lightning's FSDP loading bypasses the CheckpointIO plugin that reads them)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        # Lightning passes device_id=None on CPU, which torch's FSDP refuses ("needs a non-CPU accelerator")
        from pytorch_lightning.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        kwargs = dict(self.kwargs)
        if kwargs.pop("sync_module_states", False):  # FSDP syncs only GPU tensors: broadcast rank 0's here
            with torch.no_grad():
                for t in model.state_dict().values():
                    torch.distributed.broadcast(t, src=0)
        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    @contextlib.contextmanager
    def _patched(self, **replace):
        """Lightning's FSDP module with some helpers replaced; on CPU, full state dicts without offload_to_cpu
        (torch's FSDP crashes offloading CPU tensors to the CPU)."""
        import pytorch_lightning.strategies.fsdp as pl_fsdp

        if self.root_device.type == "cpu":
            replace["_get_full_state_dict_context"] = _full_state_dict_context_in_place
        saved = {k: getattr(pl_fsdp, k) for k in replace}
        for k, v in replace.items():
            setattr(pl_fsdp, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(pl_fsdp, k, v)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with self._patched():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        with self._patched():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded (directory) checkpoint: Lightning's own format
            with self._patched():
                return super().load_checkpoint(path, weights_only)
        ckpt = self.checkpoint_io.load_checkpoint(path)  # safetensors weights joined back as "state_dict"
        weights = ckpt["state_dict"]
        with self._patched(_lazy_load=lambda _path: ckpt):  # Lightning's full-checkpoint path, fed ours
            out = super().load_checkpoint(path, weights_only)
        out["state_dict"] = weights  # Lightning popped it; the module's on_load_checkpoint checks its names
        return out


def _full_state_dict_context_in_place(module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                                state_dict_config=FullStateDictConfig(rank0_only=rank0_only),
                                optim_state_dict_config=FullOptimStateDictConfig(rank0_only=rank0_only))


def fsdp_strategy(preset: TrainProfile, model: torch.nn.Module) -> DeftFSDPStrategy:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layers = decoder_layer_classes(model)
    return DeftFSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy(layers),
        activation_checkpointing_policy=ModuleWrapPolicy(layers) if preset.gradient_checkpointing else None,
        sharding_strategy=preset.fsdp_sharding,
        cpu_offload=preset.fsdp_cpu_offload,
        state_dict_type="full",
        sync_module_states=True,  # every rank starts from rank 0's weights, whatever its own init
        limit_all_gathers=True,  # bounds the memory of prefetched layers
    )


def make_strategy(preset: TrainProfile, model: torch.nn.Module | None = None, optimizer: str = "adamw"):
    """What `pl.Trainer(strategy=...)` gets for the profile (a name, or a strategy object for fsdp)."""
    check_launch(preset)
    name = strategy_name(preset)
    if name == "fsdp":
        if model is None:
            raise DeftlabError("strategy fsdp needs the model to find its decoder layers")
        check_fsdp_model(model, optimizer)
        return fsdp_strategy(preset, model)
    if name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except Exception as e:  # noqa: BLE001  (a broken install fails in many ways)
            raise DeftlabError(f"strategy deepspeed: the deepspeed package does not import ({type(e).__name__}: "
                               f"{e})", "pip install deepspeed, or use strategy ddp / fsdp") from None
        return "deepspeed_stage_2"
    return name


def unshard_to_rank0(module: torch.nn.Module, trainer) -> None:
    """After FSDP training: gather the full state dict (a collective: every rank calls this), then on rank 0 replace
    the FSDP / checkpoint wrappers by the modules they wrap and give those the full trained tensors, so the model
    evaluates and saves as an ordinary one. Other ranks' models stay sharded (they do not evaluate)."""
    state = trainer.strategy.lightning_module_state_dict()  # full, on rank 0 only, offloaded to the CPU
    if not trainer.is_global_zero:
        return
    _unwrap(module)
    # assigned, not copied: the modules still hold FSDP's (flat, sharded) views, whose shapes differ
    unexpected = []
    for key, tensor in state.items():
        owner, _, attr = key.rpartition(".")
        mod = module.get_submodule(owner)
        if attr in mod._parameters:
            old = mod._parameters[attr]
            mod._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=old is None or old.requires_grad)
        elif attr in mod._buffers:
            mod._buffers[attr] = tensor
        else:
            unexpected.append(key)
    missing = [n for n, p in module.named_parameters() if n not in state]
    if missing or unexpected:
        raise DeftlabError(f"FSDP's gathered state dict does not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})", "report this with the model and strategy")
    for m in module.modules():  # FSDP's marks: HF generate would sync every step with the other ranks
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            m.__dict__.pop(attr, None)
    base = getattr(module, "model", module)
    if hasattr(base, "tie_weights"):  # assign=True gave tied tensors separate Parameters
        base.tie_weights()


def _unwrap(root: torch.nn.Module) -> None:
    for name, child in list(root.named_children()):
        inner = child
        while True:
            nxt = getattr(inner, "_fsdp_wrapped_module", None) or getattr(inner, "_checkpoint_wrapped_module", None)
            if nxt is None:
                break
            inner = nxt
        if inner is not child:
            setattr(root, name, inner)
        _unwrap(inner)
