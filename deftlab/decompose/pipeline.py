"""Compress a model: calibrate (cached) → decompose (cached) → allocate ranks → swap in low-rank layers.

`compress_model` is the library entry point; `run_compress` is the experiment-registry run kind "compress".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from deftlab.config import from_dict, to_dict
from deftlab.decompose.targets import DEFAULT_TARGETS, layer_index, target_linears
from deftlab.errors import DeftlabError
from deftlab.settings import cache_dir

log = logging.getLogger(__name__)


@dataclass
class CompressConfig:
    model: str = "smollm2-135m"
    calib: str = "arith"  # calibration task (deftlab.data.calibration)
    calib_n: int = 256  # DeFT's default
    calib_seed: int = 42
    calib_max_length: int = 512
    calib_batch_size: int = 8
    svd: Literal["whitened", "plain"] = "whitened"
    allocator: Literal["deft", "welore", "owl", "uniform", "none"] = "deft"
    keep: float | None = None  # fraction of decoder-linear parameters preserved (DeFT's "85%")
    err: float | None = None  # effective rank reduction (WeLore's ERR)
    eta: float = 1.0
    group: int = 32
    owl_lamda: float = 0.08
    owl_m: float = 5.0
    welore_min_ratio: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    ppl: list[str] = field(default_factory=lambda: ["wikitext2", "arith"])
    ppl_max_tokens: int | None = 8192
    ppl_seqlen: int = 2048
    dtype: str | None = None
    device: str = "cpu"

    def validate(self) -> None:
        if self.allocator != "none" and (self.keep is None) == (self.err is None):
            raise DeftlabError(f"allocator '{self.allocator}' needs exactly one of keep= or err=",
                               "e.g. --keep 0.85 (parameters preserved) or --err 0.3 (rank reduction)")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise DeftlabError(f"keep={self.keep} is not a fraction in (0, 1]", "e.g. --keep 0.85")
        if self.err is not None and not 0 <= self.err < 1:
            raise DeftlabError(f"err={self.err} is not a fraction in [0, 1)", "e.g. --err 0.3")

    @property
    def needs_stats(self) -> bool:
        return self.svd == "whitened" or self.allocator == "owl" or (self.allocator == "deft" and self.eta != 0)


def calibration_stats(cfg: CompressConfig, lm, data_dir=None):
    """Gram matrices and outlier ratios for cfg's calibration set, from the cache when present."""
    from deftlab.data.calibration import calibration_texts, fingerprint
    from deftlab.decompose.calibration import CalibrationStats, collect_statistics, stats_key, token_batches
    from deftlab.errors import CacheCorruptError

    from deftlab.eval.corpora import alpaca_text

    # Calibrate on task data in the format the model is fine-tuned on (Alpaca for arithmetic).
    fmt = alpaca_text if cfg.calib in ("arith", "generated") else None
    texts = calibration_texts(cfg.calib, n=cfg.calib_n, seed=cfg.calib_seed, data_dir=data_dir, formatter=fmt)
    key = stats_key(lm.fingerprint, fingerprint(texts), cfg.targets, cfg.calib_max_length, 5.0)
    path = cache_dir() / "calibration" / key
    if (path / "stats.json").exists():
        try:
            return CalibrationStats.load(path), key
        except CacheCorruptError as e:
            log.warning("%s; recollecting", e)
    batches = list(token_batches(lm.tokenizer, texts, batch_size=cfg.calib_batch_size,
                                 max_length=cfg.calib_max_length))
    stats = collect_statistics(lm.model, batches, targets=cfg.targets, total=len(batches))
    stats.info.update({"calib": cfg.calib, "n": cfg.calib_n, "seed": cfg.calib_seed})
    stats.save(path)
    return stats, key


def compress_model(cfg: CompressConfig, *, loaded=None, data_dir=None, lora_rank: int = 0, lora_alpha: float = 16.0,
                   init: str = "deft"):
    """Returns (model, report). The model is modified in place (its target linears are replaced).

    With lora_rank > 0 and init="deft", the r components after the top θ−r of each matrix are returned in
    report["lora_tails"] (for deftlab.adapters.attach) and the frozen factors keep only θ−r components.
    """
    from deftlab.allocate import MatrixSpectrum, allocate
    from deftlab.decompose.cache import DecompositionCache, decomposition_key, decompose_all
    from deftlab.models import load_model

    lm = loaded or load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    t0 = time.time()
    linears = target_linears(lm.model, cfg.targets)
    params_before = sum(p.numel() for p in lm.model.parameters())
    stats, skey = calibration_stats(cfg, lm, data_dir) if cfg.needs_stats else (None, None)
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    grams = {n: stats.gram(n) for n in linears} if cfg.svd == "whitened" else None
    cache = DecompositionCache(decomposition_key(lm.fingerprint, skey if grams else None, cfg.targets),
                               meta={"model": lm.spec.name, "svd": cfg.svd, "stats": skey})
    decs = decompose_all(weights, grams, cache)
    spectra = [MatrixSpectrum(name=n, layer=layer_index(n), out_features=w.shape[0], in_features=w.shape[1],
                              sigma=decs[n].sigma) for n, w in weights.items()]
    report = {"config": to_dict(cfg), "params_before": params_before, "stats_key": skey,
              "decomposition_dir": str(cache.dir)}
    if cfg.allocator == "none":
        report.update(allocation=None, params_after=params_before, seconds=time.time() - t0)
        return lm.model, report
    kw = {}
    if cfg.allocator == "deft":
        kw = {"alpha": stats.alpha if stats else None, "eta": cfg.eta, "group": cfg.group}
    elif cfg.allocator == "owl":
        from deftlab.allocate.owl import layer_outlier_ratios

        sq = {n: torch.diagonal(stats.gram(n)) for n in linears}
        kw = {"outlier_ratios": layer_outlier_ratios(weights, sq, {n: layer_index(n) for n in linears},
                                                      M=cfg.owl_m), "lamda": cfg.owl_lamda}
    elif cfg.allocator == "welore":
        kw = {"min_ratio": cfg.welore_min_ratio}
    alloc = allocate(spectra, cfg.allocator, keep=cfg.keep, err=cfg.err, **kw)
    from deftlab.surgery.replace import build_decomposed_model

    _, tails = build_decomposed_model(lm.model, alloc, decs, lora_rank=lora_rank, lora_alpha=lora_alpha, init=init)
    report.update(allocation=alloc, lora_tails=tails, alpha=stats.alpha if stats else None,
                  params_after=sum(p.numel() for p in lm.model.parameters()), seconds=time.time() - t0)
    return lm.model, report


def allocation_frame(report):
    """Per-matrix table: rank, factored, LRC, α, f(θ), params (Figure 6's data)."""
    df = report["allocation"].to_frame()
    if report.get("alpha"):
        df["alpha"] = df["name"].map(report["alpha"])
    return df


def run_compress(params: dict, run_dir: Path) -> dict:
    """Registry run kind "compress": perplexity of the compressed model on cfg.ppl corpora."""
    from deftlab.eval.corpora import corpus_text
    from deftlab.eval.perplexity import perplexity, tokenize_corpus
    from deftlab.models import load_model

    data_dir = params.pop("data_dir", None)
    cfg = from_dict(CompressConfig, params)
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model, report = compress_model(cfg, loaded=lm, data_dir=data_dir)
    metrics = {"params_total": report["params_after"], "params_dense_total": report["params_before"],
               "seconds_compress": round(report["seconds"], 1)}
    if report["allocation"] is not None:
        a = report["allocation"]
        metrics.update(keep_fraction=a.keep_fraction, err=a.err, params_decoder_kept=a.params_kept,
                       params_decoder_dense=a.params_dense)
        allocation_frame(report).to_csv(run_dir / "allocation.csv", index=False)
    else:
        metrics.update(keep_fraction=1.0, err=0.0)
    for corpus in cfg.ppl:
        ids = tokenize_corpus(lm.tokenizer, corpus_text(corpus, data_dir))
        r = perplexity(model, ids, seqlen=cfg.ppl_seqlen, max_tokens=cfg.ppl_max_tokens, desc=f"ppl {corpus}")
        metrics[f"ppl_{corpus}"] = r.ppl
        metrics[f"ppl_{corpus}_tokens"] = r.tokens
        metrics[f"ppl_{corpus}_prefix"] = r.prefix
    return metrics
