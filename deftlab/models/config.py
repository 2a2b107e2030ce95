"""`ModelConfig`: which model a run loads, in which dtype, on which device (nested in every run config)."""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_MODEL = "smollm2-135m"  # the embedded default (configs/models/smollm2-135m.yaml)


@dataclass(frozen=True)
class ModelConfig:
    """model: a name in configs/models, a hub id or a local HF directory. dtype: None = the model config's.
    device: auto = cuda when available, else cpu (the run trains, evaluates and decomposes there)."""

    model: str = DEFAULT_MODEL
    dtype: str | None = None
    device: str = "auto"

    def resolve(self) -> "ModelConfig":
        if self.device != "auto":
            return self
        import torch

        return replace(self, device="cuda" if torch.cuda.is_available() else "cpu")

    def load(self, weights: bool = True):
        """The `LoadedModel` (weights, tokenizer, spec, fingerprint) on the resolved device; weights=False: on
        the meta device, its checkpoint located but not read (block-by-block pipelines)."""
        from deftlab.models.loading import load_model

        cfg = self.resolve()
        return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, weights=weights)
