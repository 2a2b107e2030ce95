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

ASVD_RATIOS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # ASVD's sensitivity ratios (since its commit 1d213d5)

Allocator = Literal["deft", "welore", "owl", "uniform", "svdllm", "asvd", "wanda", "none"]
# fine-tuning method -> the decomposition params it implies when they are unset
METHOD_DEFAULTS: dict[str, dict[str, str]] = {
    "deft": {"allocator": "deft", "svd": "whitened"},
    "welore": {"allocator": "welore", "svd": "plain"},
    "svdllm": {"allocator": "svdllm", "svd": "whitened"},  # SVD-LLM: whitening, one ratio everywhere
    "asvd": {"allocator": "asvd", "svd": "asvd"},  # ASVD: activation scaling + sensitivity search
    "wanda": {"allocator": "wanda"},  # pruning + LoRA at DeFT's parameter count
}
# task -> its calibration corpus (deftlab.data.calibration): DeFT calibrates on the task's own training text
TASK_CALIB = {"arith": "arith", "generated": "generated", "xsum": "xsum", "math": "math", "text": "c4"}
OUTLIER_THRESHOLD = 5.0  # α counts |A| > 5 × mean|A| (DeFT eq. 4, after OWL)


@dataclass(frozen=True)
class DecompositionConfig:
    """allocator: deft (Algorithm 1) | welore | owl | uniform | svdllm (θ = ⌊mnρ/(m+n)⌋, ρ = keep) | wanda
    (unstructured pruning, no SVD: Wanda scores, per-row masks; wanda_owl: OWL's per-block sparsities) | asvd
    (ASVD's sensitivity search: each matrix truncated alone at each of asvd_ratios, perplexity on asvd_sensitivity_n
    calibration examples) | none (no decomposition). svd: asvd (ASVD's activation scaling, exponent asvd_alpha) |
    whitened (SVD-LLM,
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
    svd: Literal["whitened", "plain", "asvd"] = "whitened"
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
    wanda_owl: bool = False
    asvd_alpha: float = 0.5
    asvd_ratios: tuple[float, ...] = ASVD_RATIOS
    asvd_sensitivity_n: int = 32  # ASVD: 32 calibration sequences

    def validate(self) -> None:
        if self.allocator == "none":
            if self.keep not in (None, 1.0) or self.err not in (None, 0.0):
                raise ConfigError(f"allocator 'none' keeps every parameter (got keep={self.keep}, err={self.err})",
                                  "drop keep/err, or choose an allocator (deft, welore, owl, uniform)")
        else:
            Target(keep=self.keep, err=self.err)  # exactly one of keep / err, each in range
            if self.allocator in ("deft", "svdllm", "wanda", "asvd") and self.keep is None:
                raise ConfigError(f"allocator {self.allocator} takes a parameter budget", "pass keep= instead of err=")
        for name in ("group", "calib_n", "calib_max_length", "calib_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}",
                                  f"set {name} above 0, or leave it unset")
        if self.eta < 0:
            raise ConfigError(f"eta must be >= 0, got {self.eta}", "e.g. eta=1 (0 ignores the outlier ratios)")
        if self.blockwise and self.allocator == "wanda":
            raise ConfigError("blockwise builds decomposed layers from the cache; Wanda prunes the loaded weights",
                              "set blockwise false for allocator wanda")
        if self.allocator == "asvd" and self.svd != "asvd":
            raise ConfigError(f"allocator asvd with svd {self.svd}: ASVD measures its own decomposition's sensitivity",
                              "set svd asvd (method asvd does)")
        if self.blockwise and self.svd == "asvd":
            raise ConfigError("blockwise with svd asvd", "set blockwise false: ASVD's search runs the whole model")
        if not (0 < self.asvd_alpha <= 1 and self.asvd_sensitivity_n > 0 and self.asvd_ratios
                and all(0 < r < 1 for r in self.asvd_ratios)):
            raise ConfigError(f"ASVD settings alpha={self.asvd_alpha}, ratios={self.asvd_ratios}, "
                              f"sensitivity_n={self.asvd_sensitivity_n}", "alpha in (0, 1], ratios in (0, 1), n > 0")
        if self.wanda_owl and self.allocator != "wanda":
            raise ConfigError(f"wanda_owl with allocator {self.allocator}", "use allocator wanda, or drop wanda_owl")
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
        return self.decomposes and (self.svd == "whitened" or self.allocator in ("owl", "wanda")
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
