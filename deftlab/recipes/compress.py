"""The compress recipe: calibrate (cached) → decompose (cached) → allocate ranks → swap in low-rank layers →
perplexity. Run kind "compress"; also the first half of every decomposed fine-tuning run (`compress_model`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deftlab.allocate import MatrixSpectrum, allocate
from deftlab.allocate.base import linear_keep, model_keep_fraction, total_dense
from deftlab.allocate.owl import layer_outlier_ratios
from deftlab.config import from_params, replace, to_dict
from deftlab.data.calibration import calibration_texts, fingerprint
from deftlab.decompose.cache import DecompositionCache, decomposition_key
from deftlab.decompose.calibration import CalibrationStats, collect_statistics, stats_key, token_batches
from deftlab.decompose.config import OUTLIER_THRESHOLD, DecompositionConfig
from deftlab.decompose.driver import decompose_all
from deftlab.decompose.targets import layer_index, target_linears
from deftlab.errors import CacheCorruptError
from deftlab.eval.corpora import alpaca_text
from deftlab.eval.perplexity import PerplexityConfig, corpus_perplexities
from deftlab.models import ModelConfig
from deftlab.settings import cache_dir
from deftlab.surgery.replace import build_decomposed_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressConfig:
    """A compress run: which model, how it is decomposed, which perplexities are reported. Its params are flat
    (`keep`, `calib_n`, `ppl`, ...; deftlab.config.from_params)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    perplexity: PerplexityConfig = field(default_factory=lambda: PerplexityConfig(ppl=("wikitext2", "arith")))
    data_dir: str | None = None

    @classmethod
    def from_params(cls, params: dict) -> "CompressConfig":
        return from_params(cls, params)

    def resolve(self) -> "CompressConfig":
        return replace(self, model=self.model.resolve())


def calibration_stats(dcfg: DecompositionConfig, lm, data_dir=None, cache_root: Path | None = None):
    """Gram matrices and outlier ratios for the calibration set of `dcfg`, from the cache (under `cache_root`,
    default deftlab's cache dir) when present."""
    # Calibrate on task data in the format the model is fine-tuned on (Alpaca for arithmetic).
    fmt = alpaca_text if dcfg.calib in ("arith", "generated") else None
    texts = calibration_texts(dcfg.calib, n=dcfg.calib_n, seed=dcfg.calib_seed, data_dir=data_dir, formatter=fmt)
    key = stats_key(lm.fingerprint, fingerprint(texts), dcfg.targets, dcfg.calib_max_length, OUTLIER_THRESHOLD)
    path = Path(cache_root or cache_dir()) / "calibration" / key
    if (path / "stats.json").exists():
        try:
            return CalibrationStats.load(path), key
        except CacheCorruptError as e:
            log.warning("%s; recollecting", e)
    batches = list(token_batches(lm.tokenizer, texts, batch_size=dcfg.calib_batch_size,
                                 max_length=dcfg.calib_max_length))
    stats = collect_statistics(lm.model, batches, targets=dcfg.targets, total=len(batches),
                               threshold=OUTLIER_THRESHOLD)
    stats.info.update({"calib": dcfg.calib, "n": dcfg.calib_n, "seed": dcfg.calib_seed})
    stats.save(path)
    return stats, key


def compress_model(dcfg: DecompositionConfig, lm, *, data_dir=None, lora_rank: int = 0, lora_alpha: float = 16.0,
                   init: str = "deft", cache_root: Path | None = None):
    """Returns (model, report) for a `LoadedModel`; the model is modified in place (target linears replaced).

    cache_root: where calibration statistics and decompositions are cached (default deftlab's cache dir); an
    empty directory makes the whole calibration, SVD and search run (a cold start, as DeFT Tables 4/9 time it).

    With lora_rank > 0 and init="deft", the r components after the top θ−r of each matrix are returned in
    report["lora_tails"] (for deftlab.adapters.attach) and the frozen factors keep only θ−r components.
    Allocator "none" leaves the model dense (report["allocation"] is None).
    """
    t0 = time.time()
    params_before = sum(p.numel() for p in lm.model.parameters())
    report = {"config": to_dict(dcfg), "params_before": params_before, "stats_key": None,
              "decomposition_dir": None, "allocation": None, "lora_tails": {}, "alpha": None}
    if not dcfg.decomposes:
        report.update(params_after=params_before, seconds=time.time() - t0)
        return lm.model, report
    linears = target_linears(lm.model, dcfg.targets)
    stats, skey = calibration_stats(dcfg, lm, data_dir, cache_root) if dcfg.needs_stats else (None, None)
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    grams = {n: stats.gram(n) for n in linears} if dcfg.svd == "whitened" else None
    cache = DecompositionCache(decomposition_key(lm.fingerprint, skey if grams else None, dcfg.targets),
                               meta={"model": lm.spec.name, "svd": dcfg.svd, "stats": skey},
                               root=Path(cache_root) / "decompositions" if cache_root else None)
    decs = decompose_all(weights, grams, cache)
    spectra = [MatrixSpectrum(name=n, layer=layer_index(n), out_features=w.shape[0], in_features=w.shape[1],
                              sigma=decs[n].sigma) for n, w in weights.items()]
    kw = {}
    if dcfg.allocator == "deft":
        kw = {"alpha": stats.alpha if stats else None, "eta": dcfg.eta, "group": dcfg.group}
    elif dcfg.allocator == "owl":
        sq = {n: torch.diagonal(stats.gram(n)) for n in linears}
        kw = {"outlier_ratios": layer_outlier_ratios(weights, sq, {n: layer_index(n) for n in linears},
                                                      M=dcfg.owl_m), "lamda": dcfg.owl_lamda}
    elif dcfg.allocator == "welore":
        kw = {"min_ratio": dcfg.welore_min_ratio, "factor": dcfg.welore_factor}
    keep = dcfg.keep
    if keep is not None and dcfg.keep_of == "model":
        keep = linear_keep(keep, params_before, total_dense(spectra))
    alloc = allocate(spectra, dcfg.allocator, keep=keep, err=dcfg.err, **kw)
    _, tails = build_decomposed_model(lm.model, alloc, decs, lora_rank=lora_rank, lora_alpha=lora_alpha, init=init)
    report.update(allocation=alloc, lora_tails=tails, alpha=stats.alpha if stats else None, stats_key=skey,
                  decomposition_dir=str(cache.dir), params_after=sum(p.numel() for p in lm.model.parameters()),
                  seconds=time.time() - t0)
    return lm.model, report


def allocation_frame(report):
    """Per-matrix table: rank, factored, LRC, α, f(θ), params (DeFT Figure 6's data), and rank_reduction =
    1 − rank / full rank (WeLore Figure 6's layer-wise rank reduction ratio)."""
    df = report["allocation"].to_frame()
    df["rank_reduction"] = 1.0 - df["rank"] / df["full_rank"]
    if report.get("alpha"):
        df["alpha"] = df["name"].map(report["alpha"])
    return df


def allocation_metrics(alloc, params_model: int | None = None) -> dict:
    """The budget a run reached (keep fraction of the decoder linears, and of the whole model of `params_model`
    parameters when given; ERR; kept / dense decoder parameters) and, for WeLore, the global threshold τ on the
    normalised singular values that reached it (`welore_tau`, WeLore Table 7's k)."""
    if alloc is None:
        return {"keep_fraction": 1.0, "err": 0.0} | ({"keep_fraction_model": 1.0} if params_model else {})
    out = {"keep_fraction": alloc.keep_fraction, "err": alloc.err, "params_decoder_kept": alloc.params_kept,
           "params_decoder_dense": alloc.params_dense}
    if params_model:  # the paper's budget: kept θ(m+n) with everything outside the linears (DeFT tails included)
        out["keep_fraction_model"] = model_keep_fraction(params_model, alloc.params_dense, alloc.params_kept)
    if alloc.method == "welore" and "tau" in alloc.info:
        out["welore_tau"] = float(alloc.info["tau"])
    return out


def run_compress(params: dict, run_dir: Path) -> dict:
    """Run kind "compress": perplexity of the compressed model on the `ppl` corpora; allocation.csv per matrix."""
    cfg = CompressConfig.from_params(params).resolve()
    lm = cfg.model.load()
    model, report = compress_model(cfg.decomposition, lm, data_dir=cfg.data_dir)
    metrics = {"params_total": report["params_after"], "params_dense_total": report["params_before"],
               # WeLore Table 4's "Compressed Params" (0.67× at 50%): all parameters, embeddings included
               "params_total_fraction": report["params_after"] / report["params_before"],
               "seconds_compress": round(report["seconds"], 1),
               **allocation_metrics(report["allocation"], report["params_before"])}
    if report["allocation"] is not None:
        allocation_frame(report).to_csv(Path(run_dir) / "allocation.csv", index=False)
    metrics.update(corpus_perplexities(model, lm.tokenizer, cfg.perplexity, data_dir=cfg.data_dir))
    return metrics


def resolved_config(params: dict) -> dict:
    """The resolved config of a compress run, as the store records it."""
    return to_dict(CompressConfig.from_params(params).resolve())
