"""Rank allocation: which rank θ each decomposed matrix keeps under a global budget.

One interface, six methods: ``allocate(spectra, method, keep=... | err=..., **kw)`` with method in
{"deft", "welore", "owl", "uniform", "svdllm", "asvd"}. All are pure functions of the singular values (plus α / outlier ratios).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from deftlab.allocate.asvd import asvd_allocate
from deftlab.allocate.base import (
    LRC_RATIO,
    Allocation,
    MatrixSpectrum,
    Target,
    break_even_rank,
    dense_params,
    energy,
    factored_params,
    lrc_labels,
    stored_params,
)
from deftlab.allocate.deft import deft_search
from deftlab.allocate.owl import layer_outlier_ratios, owl_allocate
from deftlab.allocate.svdllm import svdllm_allocate
from deftlab.allocate.uniform import uniform_allocate
from deftlab.allocate.welore import welore_allocate
from deftlab.errors import DeftlabError, UnknownNameError

__all__ = ["ALLOCATORS", "LRC_RATIO", "asvd_allocate", "Allocation", "MatrixSpectrum", "Target", "allocate", "break_even_rank",
           "deft_search", "dense_params", "energy", "factored_params", "layer_outlier_ratios", "lrc_labels",
           "owl_allocate", "stored_params", "svdllm_allocate", "uniform_allocate", "welore_allocate"]


def _deft(spectra, target: Target, **kw) -> Allocation:
    if target.kind != "keep":
        raise DeftlabError("the DeFT search takes a parameter budget, not err=",
                           "pass keep= (fraction of parameters preserved, e.g. 0.85)")
    return deft_search(spectra, target.keep, **kw)


def _welore(spectra, target: Target, **kw) -> Allocation:
    return welore_allocate(spectra, err=target.err, keep=target.keep, **kw)


def _owl(spectra, target: Target, **kw) -> Allocation:
    return owl_allocate(spectra, err=target.err, keep=target.keep, **kw)


def _asvd(spectra, target: Target, **kw) -> Allocation:
    return asvd_allocate(spectra, err=target.err, keep=target.keep, **kw)


def _svdllm(spectra, target: Target, **kw) -> Allocation:
    return svdllm_allocate(spectra, err=target.err, keep=target.keep, **kw)


def _uniform(spectra, target: Target, **kw) -> Allocation:
    return uniform_allocate(spectra, err=target.err, keep=target.keep, **kw)


# name → (adapter, function whose keyword options it accepts)
ALLOCATORS: dict[str, tuple[Callable, Callable]] = {
    "deft": (_deft, deft_search),
    "welore": (_welore, welore_allocate),
    "owl": (_owl, owl_allocate),
    "uniform": (_uniform, uniform_allocate),
    "svdllm": (_svdllm, svdllm_allocate),
    "asvd": (_asvd, asvd_allocate),
}
_TARGET_ARGS = {"spectra", "keep", "err"}


def allocate(spectra, method: str, *, keep: float | None = None, err: float | None = None, **kw) -> Allocation:
    """Allocate ranks with ``method`` for exactly one target: ``keep`` (params preserved) or ``err``."""
    if method not in ALLOCATORS:
        raise UnknownNameError("allocator", method, ALLOCATORS)
    adapter, fn = ALLOCATORS[method]
    options = set(inspect.signature(fn).parameters) - _TARGET_ARGS
    unknown = sorted(set(kw) - options)
    if unknown:
        raise DeftlabError(f"allocator '{method}' has no option {', '.join(unknown)}",
                           f"its options are: {', '.join(sorted(options)) or 'none'}")
    return adapter(spectra, Target.from_kwargs(keep=keep, err=err), **kw)
