"""Shared vocabulary of the rank allocators: spectra, parameter counts, energy, targets and the Allocation.

Parameter accounting (research notes §7.3, §10 ASVD): the denominator is the decomposed decoder linears only.
A matrix kept at rank θ costs θ(m+n) as factors, but a matrix whose factors would not be smaller than m·n stays
dense (cost m·n) — so between break-even and full rank a rank cut saves nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deftlab.errors import BudgetError, DeftlabError

# WeLore's fine-tuning split: a matrix is a low-rank component (LRC) iff pruned/full > 0.4999 (the "50% rule").
LRC_RATIO = 0.4999
# which rank-reduced matrices become two matrices: every one whose factors are smaller than dense ("break-even",
# deftlab's default), or only the LRCs (WeLore §3: "we replace weight matrices of all LRCs ... as composition of
# two small matrices"; an N-LRC keeps one dense matrix, rank-reduced or not)
FACTOR_RULES = ("break-even", "lrc")


@dataclass(frozen=True)
class MatrixSpectrum:
    """Singular values of one matrix (m = out_features, n = in_features).

    For whitened decompositions these are the whitened σ, whose squares are the exact output losses.
    """

    name: str
    layer: int
    out_features: int
    in_features: int
    sigma: Tensor

    def __post_init__(self) -> None:
        if self.out_features < 1 or self.in_features < 1:
            raise DeftlabError(f"{self.name}: bad shape {self.out_features}×{self.in_features}", "use positive dims")
        s = self.sigma
        if s.ndim != 1 or s.numel() != self.full_rank:
            raise DeftlabError(f"{self.name}: {tuple(s.shape)} singular values for a "
                               f"{self.out_features}×{self.in_features} matrix",
                               f"pass all min(m, n) = {self.full_rank} singular values")
        if not torch.isfinite(s).all() or bool((s < 0).any()):
            raise DeftlabError(f"{self.name}: singular values contain NaN/Inf or negatives", "recompute the SVD")
        if s.numel() > 1 and bool((s[1:] > s[:-1]).any()):
            raise DeftlabError(f"{self.name}: singular values are not in descending order", "sort them (SVD order)")

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features


def dense_params(m: int, n: int) -> int:
    return m * n


def factored_params(m: int, n: int, theta: int) -> int:
    return theta * (m + n)


def stored_params(m: int, n: int, theta: int) -> int:
    """θ(m+n) if the factors are smaller than the dense matrix, else m·n (the matrix stays dense)."""
    return theta * (m + n) if theta * (m + n) < m * n else m * n


def break_even_rank(m: int, n: int) -> int:
    """Largest θ with θ(m+n) < m·n (ranks above it are stored dense and save nothing)."""
    return (m * n - 1) // (m + n)


def is_factored(m: int, n: int, theta: int) -> bool:
    """A matrix is stored as factors iff it is rank-reduced and its factors are smaller than dense."""
    return theta < min(m, n) and theta * (m + n) < m * n


def _energy_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Cumulative energy of equal-length float64 spectra, one row each: (k × R+1), see ``energy``."""
    f = np.empty((len(rows), rows[0].shape[0] + 1), dtype=np.float64)
    f[:, 0] = 0.0
    for i, r in enumerate(rows):
        np.square(r, out=f[i, 1:])
    # torch's cumsum/div are vectorised (numpy's row-wise cumsum is ~6x slower) and sum in the same order
    body = torch.from_numpy(f)[:, 1:]
    torch.cumsum(body, dim=1, out=body)
    total = f[:, -1:].copy()
    zero = total[:, 0] == 0
    total[zero] = 1.0
    torch.from_numpy(f).div_(torch.from_numpy(total))
    f[:, -1] = 1.0  # cumsum round-off must not make "full rank" lossy
    f[zero] = 1.0  # an all-zero matrix loses nothing at any rank
    return f


def _sigma64(sigma: Tensor) -> np.ndarray:
    return sigma.detach().to(device="cpu", dtype=torch.float64).numpy()


def energy(sigma: Tensor) -> Tensor:
    """Cumulative energy f(θ) = Σ_{i≤θ} σ_i² / Σ σ_i² for θ = 0..R (float64, f(0) = 0, f(R) = 1 exactly).

    An all-zero spectrum loses nothing at any rank, so its f is 1 everywhere.
    """
    return torch.from_numpy(_energy_rows([_sigma64(sigma)])[0])


@dataclass(frozen=True)
class EnergyTable:
    """``energy`` of many spectra, batched: spectra of equal length share one (k × R+1) array."""

    arrays: list[np.ndarray]  # one per distinct length
    array_of: np.ndarray  # (L,) which array holds matrix i
    row_of: np.ndarray  # (L,) its row there

    def row(self, i: int) -> np.ndarray:
        return self.arrays[self.array_of[i]][self.row_of[i]]

    def gather(self, matrix: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """f_matrix[i](rank[i]) for flat index arrays (one fancy-index per distinct length)."""
        out = np.empty(rank.shape[0], dtype=np.float64)
        which = self.array_of[matrix]
        for a, arr in enumerate(self.arrays):
            sel = which == a if len(self.arrays) > 1 else slice(None)
            out[sel] = arr[self.row_of[matrix[sel]], rank[sel]]
        return out


def energy_table(spectra: list[MatrixSpectrum]) -> EnergyTable:
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(spectra):
        by_len.setdefault(s.sigma.numel(), []).append(i)
    arrays = []
    array_of = np.empty(len(spectra), dtype=np.int64)
    row_of = np.empty(len(spectra), dtype=np.int64)
    for a, idx in enumerate(by_len.values()):
        arrays.append(_energy_rows([_sigma64(spectra[i].sigma) for i in idx]))
        array_of[idx] = a
        row_of[idx] = np.arange(len(idx))
    return EnergyTable(arrays, array_of, row_of)


def spectrum_energies(spectra: list[MatrixSpectrum]) -> dict[str, np.ndarray]:
    """``energy`` of every spectrum as float64 numpy arrays (batched over equal lengths; same values as
    ``energy`` row by row)."""
    table = energy_table(spectra)
    return {s.name: table.row(i) for i, s in enumerate(spectra)}


@dataclass(frozen=True)
class Target:
    """A budget: either ``keep`` (fraction of parameters preserved, 0 < keep ≤ 1, DeFT's "85%") or ``err``
    (effective rank reduction Σ(full−θ)/Σ full, 0 ≤ err < 1, WeLore's target)."""

    keep: float | None = None
    err: float | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.err is None):
            raise DeftlabError("a budget needs exactly one of keep= or err=",
                               "e.g. keep=0.85 (parameters preserved) or err=0.3 (rank reduction)")
        if self.keep is not None and not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise BudgetError(f"keep={self.keep!r} is not a fraction in (0, 1]", "e.g. keep=0.85")
        if self.err is not None and not (isinstance(self.err, (int, float)) and 0 <= self.err < 1):
            raise BudgetError(f"err={self.err!r} is not a fraction in [0, 1)", "e.g. err=0.3")

    @classmethod
    def from_kwargs(cls, keep: float | None = None, err: float | None = None) -> Target:
        return cls(keep=None if keep is None else float(keep), err=None if err is None else float(err))

    @property
    def kind(self) -> str:
        return "keep" if self.keep is not None else "err"

    @property
    def value(self) -> float:
        return self.keep if self.keep is not None else self.err  # type: ignore[return-value]


@dataclass
class Allocation:
    """Per-matrix ranks chosen by an allocator, with the parameter accounting.

    ``factored[name]`` is True iff the matrix is stored as θ-rank factors (θ < full and θ(m+n) < m·n); a matrix
    at full rank is never factored, one between break-even and full is a dense rank-θ reconstruction.
    ``matrices`` holds the per-matrix details for ``to_frame`` (layer, m, n, full_rank, f_theta, params).
    """

    method: str
    ranks: dict[str, int]
    factored: dict[str, bool]
    lrc: dict[str, bool]
    params_dense: int
    params_kept: int
    err: float
    info: dict[str, Any] = field(default_factory=dict)
    matrices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def keep_fraction(self) -> float:
        """Fraction of the (decomposed-linear) parameters preserved — DeFT's "85%"."""
        return self.params_kept / self.params_dense

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "ranks": dict(self.ranks), "factored": dict(self.factored),
                "lrc": dict(self.lrc), "params_dense": self.params_dense, "params_kept": self.params_kept,
                "keep_fraction": self.keep_fraction, "err": self.err, "info": _jsonable(self.info),
                "matrices": {k: dict(v) for k, v in self.matrices.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Allocation:
        try:
            return cls(method=str(d["method"]), ranks={k: int(v) for k, v in d["ranks"].items()},
                       factored={k: bool(v) for k, v in d["factored"].items()},
                       lrc={k: bool(v) for k, v in d["lrc"].items()}, params_dense=int(d["params_dense"]),
                       params_kept=int(d["params_kept"]), err=float(d["err"]), info=dict(d.get("info", {})),
                       matrices={k: dict(v) for k, v in d.get("matrices", {}).items()})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DeftlabError(f"not a serialised Allocation ({e!r})", "pass the output of Allocation.to_dict()")

    def to_frame(self):
        """pandas DataFrame, one row per matrix: name, layer, m, n, full_rank, rank, factored, lrc, f_theta,
        params_dense, params."""
        import pandas as pd

        rows = []
        for name, rank in self.ranks.items():
            d = self.matrices.get(name, {})
            rows.append({"name": name, "layer": d.get("layer"), "m": d.get("m"), "n": d.get("n"),
                         "full_rank": d.get("full_rank"), "rank": rank, "factored": self.factored[name],
                         "lrc": self.lrc[name], "f_theta": d.get("f_theta"), "params_dense": d.get("params_dense"),
                         "params": d.get("params")})
        return pd.DataFrame(rows)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist()
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy scalars
        return x.item()
    return x


def check_spectra(spectra) -> list[MatrixSpectrum]:
    spectra = list(spectra)
    if not spectra:
        raise DeftlabError("no matrices to allocate ranks to", "pass at least one MatrixSpectrum")
    names = [s.name for s in spectra]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DeftlabError(f"duplicate matrix names {dup[:3]}", "give every matrix a unique name")
    return spectra


def total_dense(spectra: list[MatrixSpectrum]) -> int:
    return sum(dense_params(s.out_features, s.in_features) for s in spectra)


def effective_rank_reduction(spectra: list[MatrixSpectrum], ranks: dict[str, int]) -> float:
    """WeLore's ERR: Σ (full − θ) / Σ full."""
    full = sum(s.full_rank for s in spectra)
    return sum(s.full_rank - ranks[s.name] for s in spectra) / full


def is_lrc(full: int, theta: int, lrc_ratio: float = LRC_RATIO) -> bool:
    return (full - theta) / full > lrc_ratio


def check_factor_rule(factor: str) -> None:
    if factor not in FACTOR_RULES:
        raise DeftlabError(f"unknown factor rule {factor!r}", f"use one of {', '.join(FACTOR_RULES)}")


def stored_factored(m: int, n: int, theta: int, factor: str = "break-even", lrc_ratio: float = LRC_RATIO) -> bool:
    """Whether a rank-θ matrix is stored as two matrices under a FACTOR_RULES rule.

    Under break-even an LRC whose factors cost exactly m·n (square, θ = n/2) is stored factored too: it saves
    nothing and costs nothing, and LRC fine-tuning (adapter "lrc") needs its two matrices."""
    check_factor_rule(factor)
    lrc = is_lrc(min(m, n), theta, lrc_ratio)
    if factor == "lrc":
        return lrc
    return is_factored(m, n, theta) or (lrc and theta * (m + n) == m * n)


def make_allocation(method: str, spectra: list[MatrixSpectrum], ranks: dict[str, int], *,
                    lrc_ratio: float = LRC_RATIO, info: dict[str, Any] | None = None,
                    energies: dict[str, Tensor] | None = None, factor: str = "break-even") -> Allocation:
    """Build an Allocation from ranks: factored flags (`factor` rule, FACTOR_RULES), LRC labels (pruned/full >
    lrc_ratio), accounting."""
    if energies is None:
        energies = spectrum_energies(spectra)
    factored, lrc, matrices = {}, {}, {}
    kept = 0
    for s in spectra:
        m, n, full, theta = s.out_features, s.in_features, s.full_rank, int(ranks[s.name])
        if not 0 <= theta <= full:
            raise DeftlabError(f"{s.name}: rank {theta} outside 0..{full}", "report this allocator bug")
        fac = stored_factored(m, n, theta, factor, lrc_ratio)
        params = factored_params(m, n, theta) if fac else dense_params(m, n)
        kept += params
        factored[s.name] = fac
        lrc[s.name] = is_lrc(full, theta, lrc_ratio)
        f = energies[s.name]
        matrices[s.name] = {"layer": s.layer, "m": m, "n": n, "full_rank": full, "f_theta": float(f[theta]),
                            "params_dense": dense_params(m, n), "params": params}
    return Allocation(method=method, ranks={s.name: int(ranks[s.name]) for s in spectra}, factored=factored,
                      lrc=lrc, params_dense=total_dense(spectra), params_kept=kept,
                      err=effective_rank_reduction(spectra, ranks), info=dict(info or {}), matrices=matrices)


def lrc_labels(allocation: Allocation, lrc_ratio: float = LRC_RATIO) -> dict[str, bool]:
    """LRC (True) / N-LRC (False) per matrix from its ranks: pruned/full > lrc_ratio (WeLore's 0.5 rule)."""
    out = {}
    for name, theta in allocation.ranks.items():
        full = allocation.matrices.get(name, {}).get("full_rank")
        if full is None:
            raise DeftlabError(f"allocation lacks the full rank of {name}", "build it with make_allocation")
        out[name] = is_lrc(full, theta, lrc_ratio)
    return out


def minimum_params(spectra: list[MatrixSpectrum], floors: dict[str, int] | None = None) -> int:
    """Fewest parameters any allocation with ranks ≥ floors (default 1) can keep."""
    total = 0
    for s in spectra:
        floor = max(1, (floors or {}).get(s.name, 1))
        total += stored_params(s.out_features, s.in_features, min(floor, s.full_rank))
    return total


def linear_keep(keep_model: float, params_model: int, params_linears: int) -> float:
    """The fraction of the decoder linears' parameters to keep so that the whole model keeps `keep_model` of its
    parameters, every other parameter (embeddings, norms, LM head) kept: (keep·P − (P − P_lin)) / P_lin."""
    if not 0 < params_linears <= params_model:
        raise DeftlabError(f"linear parameters {params_linears:,} not in (0, {params_model:,}]",
                           "count the model and its decomposed linears on the same model")
    keep = (keep_model * params_model - (params_model - params_linears)) / params_linears
    if keep <= 0:
        floor = (params_model - params_linears) / params_model
        raise BudgetError(f"keep={keep_model:g} of the whole model cannot be met: the parameters outside the "
                          f"decomposed linears alone are {floor:.4f} of it", f"use keep > {floor:.4f}")
    return min(keep, 1.0)


def model_keep_fraction(params_model: int, params_linears_dense: int, params_linears_kept: int) -> float:
    """The whole model's fraction of parameters kept when its decoder linears go from dense to kept."""
    return (params_model - params_linears_dense + params_linears_kept) / params_model


def budget_error(target_keep: float, min_keep: float, what: str) -> BudgetError:
    need = math.ceil(min_keep * 1e4) / 1e4
    return BudgetError(f"keep={target_keep:g} cannot be met: the minimum achievable is {min_keep:.4f} ({what})",
                       f"use keep ≥ {need:.4f}")
