"""Whitened SVD (SVD-LLM) of a linear layer and the factors DeFT builds from it. Pure functions on tensors.

Conventions (research notes §7.1–7.2, §7.6):

- W ∈ ℝ^{out×in} (``nn.Linear.weight``, y = W x); the input Gram is G = XᵀX ∈ ℝ^{in×in} with X (tokens × in).
- S = chol(G) lower, G = S Sᵀ; SVD of W·S = U Σ Vᵀ; the rank-θ truncation W' = U_θ Σ_θ (Vᵀ S⁻¹)_θ minimises
  ‖(W − W')Xᵀ‖_F and the loss equals Σ_{i>θ} σ_i² exactly (SVD-LLM Theorem 1). Without a Gram, S = I (plain SVD).
- Σ is split symmetrically: B = U√Σ (out×θ), A = √Σ VᵀS⁻¹ (θ×in), as in SVD-LLM, ASVD "UV" and WeLore.
- Everything up to the SVD runs in float64 (exactness matters for Theorem 1; SVD-LLM issues #6/#7/#52 come from
  lower precision); S⁻¹ is never formed, VᵀS⁻¹ comes from a triangular solve.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from deftlab.decompose.gram import block_bounds
from deftlab.errors import CacheCorruptError, DeftlabError
from deftlab.linalg import thin_svd

# Relative jitter floor: JITTER_REL·trace(G)/d. An absolute 1e-6 (SVD-LLM) is meaningless for an unnormalised
# Gram summed over ~10⁵ tokens, so the floor scales with the mean eigenvalue.
JITTER_REL = 1e-6
# A Cholesky pivot d_i with d_i² below this fraction of trace(G)/d counts as a failure (numerically singular G):
# fp64 Cholesky of a rank-deficient Gram often "succeeds" with round-off pivots, and S⁻¹ would then be garbage.
PIVOT_REL = 1e-12
_MAX_DOUBLINGS = 80


class SvdCounter:
    """Counts SVD calls made by this module, so callers can assert that a cached path did no new SVDs."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()  # decompose_all runs SVDs on several threads

    def increment(self) -> None:
        with self._lock:
            self.count += 1

    def reset(self) -> None:
        self.count = 0


svd_counter = SvdCounter()


def _check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise DeftlabError(f"{what} contains NaN or Inf",
                           "recollect the calibration statistics / reload the weights (fp16 overflow?)")


def cholesky_factor(gram: Tensor) -> tuple[Tensor, float]:
    """Lower-triangular float64 S with G (+ λI) = S Sᵀ, and the jitter λ that had to be added (0.0 if none).

    Regularisation: if G is not numerically positive definite (Cholesky fails, or a pivot² falls below
    ``PIVOT_REL·trace(G)/d``), we retry with G + λI, λ = ``JITTER_REL``·trace(G)/d, doubling λ until the
    factorisation succeeds. This lands within 2× of SVD-LLM's λ = −λ_min(G) + floor (research notes §7.2) with
    the floor made relative to G's scale, but needs only Choleskys: the eigenvalue decomposition behind λ_min
    costs 1–2× the layer's SVD itself (d_in = 1536: ~2 s vs ~0.1 s per Cholesky). With jitter, Theorem 1 holds
    for G + λI (a slightly more isotropic calibration set), not for G itself; callers should log it.

    Raises DeftlabError on NaN/Inf, a non-square input or a Gram with zero trace (no calibration tokens).
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise DeftlabError(f"Gram matrix has shape {tuple(gram.shape)}, expected a square (in × in) matrix",
                           "pass XᵀX of the layer's inputs")
    # No re-symmetrising: LAPACK's potrf reads the lower triangle only, so an upper triangle off by round-off
    # changes nothing (and (G + Gᵀ)/2 of a 1536-wide Gram costs ~80 % of its Cholesky, cache-unfriendly).
    G = gram.detach().to(torch.float64)
    _check_finite(G, "Gram matrix")
    d = G.shape[0]
    scale = float(torch.diagonal(G).sum()) / d
    if scale <= 0:
        raise DeftlabError("Gram matrix has zero trace (no calibration tokens reached this layer)",
                           "check the calibration data and the hooked module names")

    def attempt(M: Tensor) -> Tensor | None:
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0 or float(torch.diagonal(L).min()) ** 2 < PIVOT_REL * scale:
            return None
        return L

    L = attempt(G)
    if L is not None:
        return L, 0.0
    lam = JITTER_REL * scale
    G = G.clone()  # the jitter goes in place; G may be the caller's own float64 tensor
    diag = torch.diagonal(G).clone()
    for _ in range(_MAX_DOUBLINGS):
        torch.diagonal(G).copy_(diag + lam)  # G + λI in place (no second d×d buffer)
        L = attempt(G)
        if L is not None:
            return L, lam
        lam *= 2
    raise DeftlabError(f"Cholesky of the Gram failed even with jitter {lam:.3g}",
                       "the Gram is badly scaled; recollect calibration statistics in float64")


@dataclass
class Decomposition:
    """W·S = U Σ Vᵀ stored as U (out×R), σ (R, float64, descending) and the rows of VᵀS⁻¹ (R×in).

    For the plain variant (no Gram) S = I and ``Vt_Sinv`` is just Vᵀ. U·diag(σ)·Vt_Sinv reconstructs W.
    """

    U: Tensor
    sigma: Tensor
    Vt_Sinv: Tensor
    whitened: bool = False
    jitter: float = 0.0

    def __post_init__(self) -> None:
        R = self.sigma.shape[0] if self.sigma.ndim == 1 else -1
        if self.U.ndim != 2 or self.Vt_Sinv.ndim != 2 or self.U.shape[1] != R or self.Vt_Sinv.shape[0] != R:
            raise DeftlabError(
                f"inconsistent decomposition shapes U {tuple(self.U.shape)}, sigma {tuple(self.sigma.shape)}, "
                f"Vt_Sinv {tuple(self.Vt_Sinv.shape)}", "expect U (out×R), sigma (R,), Vt_Sinv (R×in)")

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the decomposed weight."""
        return int(self.U.shape[0]), int(self.Vt_Sinv.shape[1])

    @property
    def full_rank(self) -> int:
        """Number of stored components (min(out, in) for a decomposition from ``whitened_svd``)."""
        return int(self.sigma.shape[0])

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors for safetensors, JSON-able metadata); inverse of ``from_tensors``."""
        tensors = {"U": self.U, "sigma": self.sigma, "Vt_Sinv": self.Vt_Sinv}
        return tensors, {"whitened": bool(self.whitened), "jitter": float(self.jitter)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict | None = None) -> Decomposition:
        missing = {"U", "sigma", "Vt_Sinv"} - set(tensors)
        if missing:
            raise CacheCorruptError(f"stored decomposition lacks {sorted(missing)}", "delete the cache entry")
        meta = meta or {}
        try:
            return cls(U=tensors["U"], sigma=tensors["sigma"], Vt_Sinv=tensors["Vt_Sinv"],
                       whitened=bool(meta.get("whitened", False)), jitter=float(meta.get("jitter", 0.0)))
        except DeftlabError as e:
            raise CacheCorruptError(f"stored decomposition is inconsistent ({e.problem})",
                                    "delete the cache entry") from None


def whitened_svd(W: Tensor, gram: Tensor | None, *, dtype: torch.dtype = torch.float32,
                 cholesky: tuple[Tensor, float] | None = None) -> Decomposition:
    """Decompose W (out×in): whitened by chol(gram) (SVD-LLM), or a plain SVD when ``gram`` is None.

    The product W·S, the SVD and the triangular solve run in float64; U and VᵀS⁻¹ are stored in ``dtype``
    (float32 by default; float64 for exactness checks), σ always in float64. ``cholesky``: the result of
    ``cholesky_factor(gram)`` when the caller already has it (layers sharing one Gram share one factor).
    """
    if W.ndim != 2:
        raise DeftlabError(f"weight has shape {tuple(W.shape)}, expected a matrix (out × in)", "pass Linear.weight")
    W64 = W.detach().to(torch.float64)
    _check_finite(W64, "weight")
    if gram is None:
        U, s, Vh = thin_svd(W64)
        svd_counter.increment()
        return Decomposition(U=U.to(dtype), sigma=s, Vt_Sinv=Vh.to(dtype), whitened=False, jitter=0.0)
    if tuple(gram.shape) != (W.shape[1], W.shape[1]):
        raise DeftlabError(f"Gram {tuple(gram.shape)} does not match weight {tuple(W.shape)}",
                           "the Gram must be (in × in) of the same layer's inputs")
    S, jitter = cholesky if cholesky is not None else cholesky_factor(gram.to(W64.device))
    U, s, Vh = thin_svd(matmul_lower(W64, S))
    svd_counter.increment()
    # rows of Vᵀ S⁻¹: solve X·S = Vᵀ (S lower-triangular) instead of forming S⁻¹
    Vt_Sinv = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)
    return Decomposition(U=U.to(dtype), sigma=s, Vt_Sinv=Vt_Sinv.to(dtype), whitened=True, jitter=jitter)


def matmul_lower(W: Tensor, S: Tensor, blocks: int | None = None) -> Tensor:
    """W·S for lower-triangular S, skipping its zero upper blocks: column block j of the product only needs
    rows j: of S, so b GEMMs do (b + 1)/(2b) of the dense product's work (torch exposes no TRMM)."""
    n = S.shape[0]
    bounds = block_bounds(n, blocks)
    out = torch.empty(W.shape[0], n, dtype=torch.promote_types(W.dtype, S.dtype), device=W.device)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        torch.matmul(W[:, lo:], S[lo:, lo:hi], out=out[:, lo:hi])
    return out


def _check_rank(dec: Decomposition, rank: int, what: str = "rank") -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= dec.full_rank:
        raise DeftlabError(f"{what} {rank!r} is outside 0..{dec.full_rank}",
                           f"choose an integer {what} between 0 and the matrix's full rank")


def truncated_factors(dec: Decomposition, rank: int) -> tuple[Tensor, Tensor]:
    """(B, A) = (U_θ√Σ_θ, √Σ_θ (VᵀS⁻¹)_θ) in the decomposition's dtype; B @ A is the rank-θ reconstruction W'."""
    _check_rank(dec, rank)
    root = dec.sigma[:rank].sqrt()
    B = dec.U[:, :rank] * root.to(dec.U.dtype)
    A = root.to(dec.Vt_Sinv.dtype)[:, None] * dec.Vt_Sinv[:rank]
    return B, A


def split_for_lora(dec: Decomposition, rank: int, lora_rank: int,
                   scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DeFT init: (W_u, W_v, lora_B, lora_A) with W_u W_v + scaling·lora_B lora_A == rank-θ reconstruction W'.

    The top θ−r kept components are frozen (W_u = U√Σ, W_v = √Σ VᵀS⁻¹); the next r (components θ−r..θ−1)
    initialise the LoRA, divided by s = scaling = α/r (PiSSA/CorDA convention): lora_B = U√(Σ/s),
    lora_A = √(Σ/s) VᵀS⁻¹. ``lora_rank`` may be 0 (empty LoRA factors).
    """
    _check_rank(dec, rank)
    if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or not 0 <= lora_rank <= rank:
        raise DeftlabError(f"lora_rank {lora_rank!r} is outside 0..{rank} (the kept rank)",
                           "use a LoRA rank no larger than the kept rank θ")
    if not (isinstance(scaling, (int, float)) and 0 < scaling < float("inf")):
        raise DeftlabError(f"LoRA scaling {scaling!r} is not a positive number", "pass scaling = lora_alpha / r")
    k = rank - lora_rank
    W_u, W_v = truncated_factors(dec, k)
    root = (dec.sigma[k:rank] / scaling).sqrt()
    lora_B = dec.U[:, k:rank] * root.to(dec.U.dtype)
    lora_A = root.to(dec.Vt_Sinv.dtype)[:, None] * dec.Vt_Sinv[k:rank]
    return W_u, W_v, lora_B, lora_A


def reconstruction_error(W: Tensor, W_approx: Tensor, gram: Tensor | None) -> float:
    """‖(W − W')Xᵀ‖_F² = trace((W−W') G (W−W')ᵀ) in float64 (G = I, i.e. ‖W − W'‖_F², when gram is None)."""
    if W.shape != W_approx.shape:
        raise DeftlabError(f"shapes differ: {tuple(W.shape)} vs {tuple(W_approx.shape)}", "compare the same layer")
    D = W.detach().to(torch.float64) - W_approx.detach().to(torch.float64)
    if gram is None:
        return float((D * D).sum())
    return float(((D @ gram.detach().to(device=D.device, dtype=torch.float64)) * D).sum())


def outlier_ratio(abs_activations: Tensor, threshold: float = 5.0) -> float:
    """Fraction of entries larger than threshold·mean (DeFT eq. 4, OWL's M·mean rule; T = 5)."""
    if abs_activations.numel() == 0:
        raise DeftlabError("no activations to compute an outlier ratio from", "run calibration on some tokens")
    a = abs_activations.detach().abs()
    _check_finite(a, "activations")
    mean = torch.mean(a, dtype=torch.float64)
    return float((a > threshold * mean).sum()) / a.numel()
