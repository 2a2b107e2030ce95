"""The compress recipe: calibrate (cached) → decompose (cached) → allocate ranks → swap in low-rank layers →
perplexity. Run kind "compress"; also the first half of every decomposed fine-tuning run (`compress_model`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deftlab import settings
from deftlab.allocate import MatrixSpectrum, allocate
from deftlab.allocate.base import linear_keep, model_keep_fraction, total_dense
from deftlab.allocate.owl import layer_outlier_ratios, owl_ratio_offsets
from deftlab.config import ConfigError, from_params, replace, to_dict
from deftlab.data.calibration import calibration_texts, fingerprint
from deftlab.decompose.cache import DecompositionCache, decomposition_key
from deftlab.decompose.asvd import activation_scale, collect_abs_mean, scaled_svd
from deftlab.decompose.asvd import sensitivity as asvd_sensitivity
from deftlab.decompose.blockwise import ShardReader, collect_statistics_blockwise
from deftlab.decompose.calibration import CalibrationStats, collect_statistics, stats_key, token_batches
from deftlab.decompose.config import OUTLIER_THRESHOLD, DecompositionConfig
from deftlab.decompose.driver import decompose_all
from deftlab.decompose.targets import layer_index, target_linears
from deftlab.errors import CacheCorruptError
from deftlab.manifest import write_json_atomic
from deftlab.eval.corpora import alpaca_text
from deftlab.eval.perplexity import PerplexityConfig, corpus_perplexities
from deftlab.models import ModelConfig
from deftlab.prune import Pruning, apply_masks, block_sparsities, wanda_mask
from deftlab.settings import cache_dir
from deftlab.surgery.params import count_params
from deftlab.surgery.quantize import nf4_finalizer
from deftlab.surgery.replace import build_decomposed_model, load_decomposed
from deftlab.train.distributed import global_rank, launched_world_size

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


def _calibration_batches(dcfg: DecompositionConfig, lm, data_dir=None) -> tuple[list[dict], str]:
    """The tokenised calibration batches of `dcfg` and their statistics' cache key."""
    # Calibrate on task data in the format the model is fine-tuned on (Alpaca for arithmetic).
    fmt = alpaca_text if dcfg.calib in ("arith", "generated") else None
    texts = calibration_texts(dcfg.calib, n=dcfg.calib_n, seed=dcfg.calib_seed, data_dir=data_dir, formatter=fmt)
    key = stats_key(lm.fingerprint, fingerprint(texts), dcfg.targets, dcfg.calib_max_length, OUTLIER_THRESHOLD)
    batches = list(token_batches(lm.tokenizer, texts, batch_size=dcfg.calib_batch_size,
                                 max_length=dcfg.calib_max_length))
    return batches, key


def calibration_stats(dcfg: DecompositionConfig, lm, data_dir=None, cache_root: Path | None = None):
    """Gram matrices and outlier ratios for the calibration set of `dcfg`, from the cache (under `cache_root`,
    default deftlab's cache dir) when present."""
    batches, key = _calibration_batches(dcfg, lm, data_dir)
    path = Path(cache_root or cache_dir()) / "calibration" / key
    if (path / "stats.json").exists():
        try:
            return CalibrationStats.load(path), key
        except CacheCorruptError as e:
            log.warning("%s; recollecting", e)
    stats = collect_statistics(lm.model, batches, targets=dcfg.targets, total=len(batches),
                               threshold=OUTLIER_THRESHOLD)
    stats.info.update({"calib": dcfg.calib, "n": dcfg.calib_n, "seed": dcfg.calib_seed})
    stats.save(path)
    return stats, key


def _decomposition_cache(dcfg: DecompositionConfig, lm, skey: str | None, cache_root: Path | None):
    return DecompositionCache(decomposition_key(lm.fingerprint, skey if dcfg.svd == "whitened" else None,
                                                dcfg.targets),
                              meta={"model": lm.spec.name, "svd": dcfg.svd, "stats": skey},
                              root=Path(cache_root) / "decompositions" if cache_root else None)


def launch_shard() -> tuple[int, int] | None:
    """(rank, world size) of a torchrun launch, whose processes split every decomposition into one cache (each
    rank computes its share, then reads the others'); None in a single process."""
    world = launched_world_size()
    return (global_rank(), world) if world and world > 1 else None


def blockwise_decomposition(dcfg: DecompositionConfig, lm, *, data_dir=None, cache_root: Path | None = None,
                            shard: tuple[int, int] | None = None, owned: list[str] | None = None):
    """Calibrate and decompose one decoder block at a time (`dcfg.blockwise`): (α or None, statistics key, cache).

    Each block is read from the checkpoint (or moved, when `lm` has its weights), its statistics collected on the
    dense model's inputs, its matrices decomposed into the cache, and its Grams freed before the next block. Only
    α is kept (calibration/<key>/alpha.json), so a later run that finds every decomposition cached calibrates
    nothing. shard=(i, n): this process decomposes the i-th of n parts of each block (`decompose_all`); their
    names are appended to `owned`."""
    owned = [] if owned is None else owned
    names = list(target_linears(lm.model, dcfg.targets))
    batches, skey = _calibration_batches(dcfg, lm, data_dir) if dcfg.needs_stats else (None, None)
    cache = _decomposition_cache(dcfg, lm, skey, cache_root)
    alpha_file = Path(cache_root or cache_dir()) / "calibration" / str(skey) / "alpha.json"
    alpha = json.loads(alpha_file.read_text())["alpha"] if skey and alpha_file.is_file() else None
    complete = all(n in cache for n in names)
    if complete and (alpha is not None or not dcfg.needs_stats):
        return alpha, skey, cache
    reader = None if lm.has_weights else ShardReader(lm.checkpoint_dir)
    whitened = dcfg.svd == "whitened"

    if not dcfg.needs_stats:  # plain SVD: nothing to calibrate; read one block's weights at a time
        for layer in sorted({layer_index(n) for n in names}):
            block = [n for n in names if layer_index(n) == layer and n not in cache]
            weights = {n: (lm.model.get_submodule(n).weight if reader is None
                           else reader.load(f"{n}.weight")[""]).to(lm.device).float() for n in block}
            owned += decompose_all(weights, None, cache, progress=False, shard=shard)
        return None, None, cache

    def on_block(i: int, stats: CalibrationStats) -> None:
        mine = [n for n in stats.alpha if whitened or n not in cache]
        weights = {n: lm.model.get_submodule(n).weight.detach().float() for n in mine}
        owned.extend(decompose_all(weights, {n: stats.gram(n) for n in mine} if whitened else None, cache,
                                   progress=False, shard=shard))

    stats = collect_statistics_blockwise(lm.model, batches, targets=dcfg.targets, threshold=OUTLIER_THRESHOLD,
                                         device=lm.device, reader=reader, keep_grams=False,
                                         on_block=None if complete else on_block)
    alpha_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = alpha_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"alpha": stats.alpha, "tokens": stats.tokens, "threshold": stats.threshold,
                               "info": {**stats.info, "calib": dcfg.calib, "n": dcfg.calib_n,
                                        "seed": dcfg.calib_seed}}, indent=1))
    os.replace(tmp, alpha_file)
    return stats.alpha, skey, cache


def compress_model(dcfg: DecompositionConfig, lm, *, data_dir=None, lora_rank: int = 0, lora_alpha: float = 16.0,
                   init: str = "deft", cache_root: Path | None = None, quantize: bool = False,
                   fold: Iterable[str] = ()):
    """Returns (model, report) for a `LoadedModel`; the model is modified in place (target linears replaced).

    cache_root: where calibration statistics and decompositions are cached (default deftlab's cache dir); an
    empty directory makes the whole calibration, SVD and search run (a cold start, as DeFT Tables 4/9 time it).

    With lora_rank > 0 and init="deft", the r components after the top θ−r of each matrix are returned in
    report["lora_tails"] (for deftlab.adapters.attach) and the frozen factors keep only θ−r components.
    Allocator "none" leaves the model dense (report["allocation"] is None).

    `dcfg.blockwise` (`blockwise_decomposition`): when `lm` has no weights (`ModelConfig.load(weights=False)`) the
    model is built from its checkpoint and the cache (`load_decomposed`) and becomes `lm.model`; quantize: its
    linears and factors are stored in NF4 as each is loaded (QLoRA), so no dense decomposed weight is ever held;
    fold: the modules whose DeFT tails go back into their frozen factors first (report["folded_tails"]).
    """
    t0 = time.time()
    params_before = sum(p.numel() for p in lm.model.parameters())
    report = {"config": to_dict(dcfg), "params_before": params_before, "stats_key": None,
              "decomposition_dir": None, "allocation": None, "lora_tails": {}, "alpha": None,
              "folded_tails": []}
    if not dcfg.decomposes:
        report.update(params_after=params_before, seconds=time.time() - t0)
        return lm.model, report
    linears = target_linears(lm.model, dcfg.targets)
    shapes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
    if dcfg.allocator == "wanda":
        return prune_model(dcfg, lm, linears, report, data_dir=data_dir, cache_root=cache_root)
    shard = launch_shard()
    if dcfg.blockwise:
        alpha, skey, cache = blockwise_decomposition(dcfg, lm, data_dir=data_dir, cache_root=cache_root, shard=shard)
        if shard:
            cache.wait_for(linears)
        decs = cache.lazy(linears)
        sigmas = {n: cache.sigma(n) for n in linears}
        weights = grams = None
    elif dcfg.svd == "asvd":
        decs, cache, skey, sens = asvd_decomposition(dcfg, lm, linears, data_dir=data_dir, cache_root=cache_root)
        sigmas, alpha, weights = {n: d.sigma for n, d in decs.items()}, None, None
    else:
        stats, skey, weights, grams, cache, decs = _whole_model_decomposition(dcfg, lm, linears, data_dir,
                                                                              cache_root, shard)
        alpha = stats.alpha if stats else None
        if shard:  # the other ranks' shares, read back once they are written (ours are in hand)
            cache.wait_for(linears)
            rest = {n: w for n, w in weights.items() if n not in decs}
            decs = {**decs, **decompose_all(rest, grams, cache, progress=False)}
        sigmas = {n: d.sigma for n, d in decs.items()}
    spectra = [MatrixSpectrum(name=n, layer=layer_index(n), out_features=shapes[n][0], in_features=shapes[n][1],
                              sigma=sigmas[n]) for n in linears]
    kw = {}
    if dcfg.allocator == "deft":
        kw = {"alpha": alpha, "eta": dcfg.eta, "group": dcfg.group}
    elif dcfg.allocator == "owl":
        sq = {n: torch.diagonal(stats.gram(n)) for n in linears}
        kw = {"outlier_ratios": layer_outlier_ratios(weights, sq, {n: layer_index(n) for n in linears},
                                                      M=dcfg.owl_m), "lamda": dcfg.owl_lamda}
    elif dcfg.allocator == "welore":
        kw = {"min_ratio": dcfg.welore_min_ratio, "factor": dcfg.welore_factor}
    elif dcfg.allocator == "asvd":
        kw = {"sensitivity": sens()}
    keep = dcfg.keep
    if keep is not None and dcfg.keep_of == "model":
        keep = linear_keep(keep, params_before, total_dense(spectra))
    alloc = allocate(spectra, dcfg.allocator, keep=keep, err=dcfg.err, **kw)
    if lm.has_weights:
        _, tails = build_decomposed_model(lm.model, alloc, decs, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                          init=init)
    else:
        dtype = next(p.dtype for p in lm.model.parameters() if p.is_floating_point())
        lm.model, tails = load_decomposed(lm.checkpoint_dir, alloc, decs, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                          init=init, dtype=dtype, device=lm.device, fold=fold,
                                          finalize=nf4_finalizer() if quantize else None)
        report["folded_tails"] = sorted(n for n in fold if alloc.ranks[n] < min(shapes[n]) or alloc.factored[n])
        if quantize:
            lm.model.is_loaded_in_4bit = True  # as quantize_for_qlora marks it (PEFT reads the flag)
    report.update(allocation=alloc, lora_tails=tails, alpha=alpha, stats_key=skey,
                  decomposition_dir=str(cache.dir), params_after=count_params(lm.model)["total"],
                  seconds=time.time() - t0)
    return lm.model, report


def asvd_decomposition(dcfg: DecompositionConfig, lm, linears: dict, *, data_dir=None,
                       cache_root: Path | None = None):
    """ASVD's activation-scaled decompositions (cached like the others, keyed by the calibration set and α), and a
    callable giving ASVD's sensitivity table (computed once per cache, then read from sensitivity-*.json)."""
    batches, skey = _calibration_batches(dcfg, lm, data_dir)
    root = Path(cache_root) / "decompositions" if cache_root else None
    cache = DecompositionCache(decomposition_key(lm.fingerprint, f"asvd:{dcfg.asvd_alpha:g}:{skey}", dcfg.targets),
                               meta={"model": lm.spec.name, "svd": "asvd", "stats": skey, "alpha": dcfg.asvd_alpha},
                               root=root)
    decs = {n: cache.get(n) for n in linears}
    missing = [n for n, d in decs.items() if d is None]
    if missing:
        abs_mean = collect_abs_mean(lm.model, {n: linears[n] for n in missing}, batches)
        for n in missing:
            decs[n] = scaled_svd(linears[n].weight, activation_scale(abs_mean[n], dcfg.asvd_alpha))
            cache.put(n, decs[n])
        cache.flush()

    def sens() -> dict[str, dict[float, float]]:
        tag = hashlib.sha256(json.dumps([dcfg.asvd_sensitivity_n, list(dcfg.asvd_ratios)]).encode()).hexdigest()[:12]
        path = cache.dir / f"sensitivity-{tag}.json"

        def read() -> dict[str, dict[float, float]]:
            return {n: {float(r): v for r, v in row.items()} for n, row in json.loads(path.read_text()).items()}

        if path.is_file():
            return read()
        examples, subset = 0, []
        for b in batches:  # the first asvd_sensitivity_n calibration examples
            if examples >= dcfg.asvd_sensitivity_n:
                break
            subset.append({k: v[: dcfg.asvd_sensitivity_n - examples] for k, v in b.items()})
            examples += len(subset[-1]["input_ids"])
        # one process measures (runs at two budgets share the table; the other waits, then reads it); finished
        # rows are saved as they come (hours at ASVD's scale), so an interrupted table resumes from them
        partial = path.with_name(f"{path.stem}.partial.json")
        with open(path.with_name(f"{path.stem}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.is_file():
                return read()
            try:
                done = json.loads(partial.read_text())
            except (OSError, ValueError):
                done = {}

            def save(name: str, row: dict[float, float]) -> None:
                done[name] = row
                write_json_atomic(partial, done)

            table = asvd_sensitivity(lm.model, linears, decs, subset, ratios=dcfg.asvd_ratios, done=done,
                                     on_matrix=save)
            write_json_atomic(path, table)
            partial.unlink(missing_ok=True)
        return table

    return decs, cache, skey, sens


def prune_model(dcfg: DecompositionConfig, lm, linears: dict, report: dict, *, data_dir=None,
                cache_root: Path | None = None):
    """Wanda pruning at the budget (`allocator: wanda`): the target linears keep `keep` of their weights (of the
    whole model with keep_of "model", as DeFT counts), the lowest |W|·‖x‖ of every row zeroed, one sparsity per
    block (uniform, or OWL's map with `wanda_owl`). The weights stay dense tensors; report["allocation"] is a
    `deftlab.prune.Pruning`."""
    t0 = time.time()
    stats, skey = calibration_stats(dcfg, lm, data_dir, cache_root)
    sq = {n: torch.diagonal(stats.gram(n)) for n in linears}
    layer_of = {n: layer_index(n) for n in linears}
    dense = sum(m.weight.numel() for m in linears.values())
    keep = dcfg.keep if dcfg.keep_of == "linears" else linear_keep(dcfg.keep, report["params_before"], dense)
    layers = sorted(set(layer_of.values()))
    offsets = None
    if dcfg.wanda_owl:
        ratios = layer_outlier_ratios({n: m.weight for n, m in linears.items()}, sq, layer_of, M=dcfg.owl_m)
        offsets = owl_ratio_offsets(ratios, layers, dcfg.owl_lamda)
    per_block = block_sparsities(1.0 - keep, layers, offsets)
    masks = {n: wanda_mask(m.weight, sq[n], per_block[layer_of[n]]) for n, m in linears.items()}
    apply_masks(linears, masks)
    pruning = Pruning(sparsity={n: 1.0 - float(k.float().mean()) for n, k in masks.items()},
                      kept={n: int(k.sum()) for n, k in masks.items()},
                      shapes={n: (m.out_features, m.in_features) for n, m in linears.items()}, layer=layer_of,
                      info={"target_sparsity": 1.0 - keep, "block_sparsity": per_block, "owl": dcfg.wanda_owl})
    report.update(allocation=pruning, alpha=stats.alpha, stats_key=skey, params_after=report["params_before"],
                  params_nonzero=report["params_before"] - dense + pruning.params_kept, seconds=time.time() - t0)
    return lm.model, report


def decompose_shard(cfg: CompressConfig, shard: tuple[int, int]) -> tuple[Path, list[str]]:
    """Fill the i-th of n parts of `cfg`'s decomposition cache (calibrating as the run would) and stop: n processes
    or machines sharing one cache run this, then the run itself finds every matrix cached. Returns the cache dir
    and the matrices this shard owns."""
    dcfg = cfg.decomposition
    if not dcfg.decomposes:
        raise ConfigError("allocator 'none' decomposes nothing", "pass --keep or --err with an allocator")
    data_dir = settings.data_dir(cfg.data_dir)
    if dcfg.allocator == "wanda" or dcfg.svd == "asvd":
        what = "Wanda pruning" if dcfg.allocator == "wanda" else "ASVD's scaled SVD"
        raise ConfigError(f"--shard splits the decomposition cache's SVDs; {what} has no sharded pass",
                          "run it without --shard")
    lm = cfg.model.load(weights=not dcfg.blockwise)
    if dcfg.blockwise:
        names: list[str] = []
        _, _, cache = blockwise_decomposition(dcfg, lm, data_dir=data_dir, shard=shard, owned=names)
        return cache.dir, names
    linears = target_linears(lm.model, dcfg.targets)
    *_, cache, decs = _whole_model_decomposition(dcfg, lm, linears, data_dir, None, shard)
    return cache.dir, list(decs)


def _whole_model_decomposition(dcfg: DecompositionConfig, lm, linears: dict, data_dir, cache_root, shard):
    """Calibrate (when the method needs statistics) and decompose this shard's share of `linears` into the cache:
    (stats, stats key, fp32 weights, Grams or None, cache, {name: Decomposition} of this shard)."""
    stats, skey = calibration_stats(dcfg, lm, data_dir, cache_root) if dcfg.needs_stats else (None, None)
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    grams = {n: stats.gram(n) for n in linears} if dcfg.svd == "whitened" else None
    cache = _decomposition_cache(dcfg, lm, skey if grams else None, cache_root)
    return stats, skey, weights, grams, cache, decompose_all(weights, grams, cache, shard=shard)


class _NoAllocation:
    ranks: dict = {}
    factored: dict = {}
    lrc: dict = {}


def load_quantized(lm) -> torch.nn.Module:
    """The dense model of a weightless `lm` (`ModelConfig.load(weights=False)`) read from its checkpoint one tensor
    at a time, each linear but the LM head stored in NF4 as soon as it is loaded: QLoRA's base without ever holding
    the model in 16 bits (LLaMA-65B: 33 GB instead of 131 GB). Becomes `lm.model`."""
    dtype = next(p.dtype for p in lm.model.parameters() if p.is_floating_point())
    lm.model, _ = load_decomposed(lm.checkpoint_dir, _NoAllocation(), {}, dtype=dtype, device=lm.device,
                                  finalize=nf4_finalizer())
    lm.model.is_loaded_in_4bit = True
    return lm.model


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
    dcfg = cfg.decomposition
    lm = cfg.model.load(weights=not (dcfg.decomposes and dcfg.blockwise))
    model, report = compress_model(dcfg, lm, data_dir=cfg.data_dir)
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
