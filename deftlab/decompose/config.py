"""`DecompositionConfig`: how a model is decomposed: calibration data, SVD, allocator and budget.

The one home of the decomposition defaults (DeFT's 256 calibration examples, the rank cut size G = 32, η = 1,
OWL's λ and M, ...) and of their validation; the compress, finetune and efficiency run configs nest it. A
fine-tuning method picks the allocator/SVD it needs when the params leave them unset (`method_params`), and a
decomposed method calibrates on its task's own training text unless `calib` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, TypeVar

from deftlab.allocate.base import Target
from deftlab.config import ConfigError, field_default, from_params
from deftlab.decompose.targets import DEFAULT_TARGETS

Allocator = Literal["deft", "welore", "owl", "uniform", "none"]
# fine-tuning method -> the decomposition params it implies when they are unset
METHOD_DEFAULTS: dict[str, dict[str, str]] = {
    "deft": {"allocator": "deft", "svd": "whitened"},
    "welore": {"allocator": "welore", "svd": "plain"},
}
# task -> its calibration corpus (deftlab.data.calibration): DeFT calibrates on the task's own training text
TASK_CALIB = {"arith": "arith", "generated": "generated", "xsum": "xsum", "math": "math", "text": "c4"}
OUTLIER_THRESHOLD = 5.0  # α counts |A| > 5 × mean|A| (DeFT eq. 4, after OWL)


@dataclass(frozen=True)
class DecompositionConfig:
    """allocator: deft (Algorithm 1) | welore | owl | uniform | none (no decomposition). svd: whitened (SVD-LLM,
    Cholesky of the input Gram) | plain. Budget: exactly one of keep (fraction of decoder-linear parameters
    preserved) and err (effective rank reduction); the DeFT search takes keep. keep_of: what keep is a fraction
    of, the decoder linears' parameters (default) or the whole model's (the DeFT paper's ~85%: 5.73B of
    LLaMA-7B's 6.74B, embeddings and LM head included); inert with err. eta: weight of the outlier ratio α in the
    search; group: its rank cut size G. calib*: the calibration set (task corpus, examples, sampling
    seed, tokens per example, batch). owl_*: OWL's λ and outlier threshold M; welore_min_ratio: WeLore's floor;
    welore_factor: which rank-reduced matrices the welore allocator makes two matrices, "break-even" (factors
    smaller than dense) or "lrc" (WeLore's rule: only LRCs); other allocators use break-even.
    blockwise: calibrate and decompose one decoder block at a time, reading it from the checkpoint's safetensors,
    and build the decomposed model from the checkpoint and the cache without ever loading the dense model
    (memory bounded by one block, not the depth: how DeFT fits LLaMA-65B on one 24 GB GPU). Same statistics,
    ranks and model as the whole-model pass; the Grams are freed block by block, so OWL (which reads them after
    calibration) needs the whole-model pass."""

    allocator: Allocator = "deft"
    svd: Literal["whitened", "plain"] = "whitened"
    keep: float | None = None
    err: float | None = None
    keep_of: Literal["linears", "model"] = "linears"
    eta: float = 1.0
    group: int = 32
    calib: str = "arith"
    calib_n: int = 256
    calib_seed: int = 42
    calib_max_length: int = 512
    calib_batch_size: int = 8
    owl_lamda: float = 0.08
    owl_m: float = 5.0
    welore_min_ratio: float = 0.0
    welore_factor: Literal["break-even", "lrc"] = "break-even"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    blockwise: bool = False

    def validate(self) -> None:
        if self.allocator == "none":
            if self.keep not in (None, 1.0) or self.err not in (None, 0.0):
                raise ConfigError(f"allocator 'none' keeps every parameter (got keep={self.keep}, err={self.err})",
                                  "drop keep/err, or choose an allocator (deft, welore, owl, uniform)")
        else:
            Target(keep=self.keep, err=self.err)  # exactly one of keep / err, each in range
            if self.allocator == "deft" and self.keep is None:
                raise ConfigError("the DeFT search takes a parameter budget", "pass keep= instead of err=")
        for name in ("group", "calib_n", "calib_max_length", "calib_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}",
                                  f"set {name} above 0, or leave it unset")
        if self.eta < 0:
            raise ConfigError(f"eta must be >= 0, got {self.eta}", "e.g. eta=1 (0 ignores the outlier ratios)")
        if self.blockwise and self.allocator == "owl":
            raise ConfigError("blockwise decomposition frees each block's Grams, which OWL's ratios read afterwards",
                              "set blockwise false for allocator owl")
        if not self.targets:
            raise ConfigError("targets is empty", "name the projections to decompose, e.g. q_proj, k_proj")

    @property
    def decomposes(self) -> bool:
        return self.allocator != "none"

    @property
    def needs_stats(self) -> bool:
        """Whether calibration statistics are needed: whitening, OWL's ratios or the search's α."""
        return self.decomposes and (self.svd == "whitened" or self.allocator == "owl"
                                    or (self.allocator == "deft" and self.eta != 0))

    @staticmethod
    def method_params(method: str, task: str, params: dict) -> dict:
        """`params` with the decomposition params a fine-tuning method implies filled in where unset.

        Settings with nothing to act on are dropped, so a preset can give them to all its runs: every
        decomposition param of a dense run without a budget, and keep_of without keep."""
        if method == "dense" and params.get("keep") is None and params.get("err") is None:
            names = {f.name for f in fields(DecompositionConfig)}
            params = {k: v for k, v in params.items() if k not in names}
        elif params.get("keep") is None and "keep_of" in params:
            params = {k: v for k, v in params.items() if k != "keep_of"}
        out = {k: v for k, v in METHOD_DEFAULTS.get(method, {}).items() if k not in params}
        if method in METHOD_DEFAULTS and "calib" not in params:
            out["calib"] = TASK_CALIB.get(task, task)
        return {**params, **out}


C = TypeVar("C")


def method_config(cls: type[C], params: dict) -> C:
    """Run config `cls` (one with `method` and `task` fields and a nested `decomposition`) from flat params, with
    the decomposition params its method implies filled in; unset method/task take `cls`'s own defaults."""
    default = {f.name: field_default(f) for f in fields(cls) if f.name in ("method", "task")}
    method, task = params.get("method", default["method"]), params.get("task", default["task"])
    return from_params(cls, DecompositionConfig.method_params(method, task, dict(params)))
