import pytest
import torch

from deftlab.decompose import whiten
from deftlab.decompose.cache import DecompositionCache
from deftlab.decompose.driver import decompose_all
from deftlab.decompose.config import DecompositionConfig
from deftlab.recipes.compress import CompressConfig, compress_model
from deftlab.errors import DeftlabError
from deftlab.models import load_model


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {f"model.layers.{i}.mlp.up_proj": torch.randn(24, 16, generator=g) for i in range(3)}
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    grams = {n: x.T @ x for n in weights}
    return weights, grams


def test_second_use_performs_zero_svds(tmp_path):
    weights, grams = _problem()
    cache = DecompositionCache("k1", root=tmp_path)
    whiten.svd_counter.reset()
    first = decompose_all(weights, grams, cache, progress=False)
    assert whiten.svd_counter.count == 3
    whiten.svd_counter.reset()
    again = decompose_all(weights, grams, DecompositionCache("k1", root=tmp_path), progress=False)
    assert whiten.svd_counter.count == 0
    for n in weights:
        assert torch.equal(first[n].sigma, again[n].sigma) and torch.equal(first[n].U, again[n].U)


def test_corrupt_entry_is_detected_and_recomputed(tmp_path, caplog):
    weights, grams = _problem()
    cache = DecompositionCache("k2", root=tmp_path)
    ref = decompose_all(weights, grams, cache, progress=False)
    victim = next(iter(weights))
    f = cache._file(victim)
    data = bytearray(f.read_bytes())
    data[-20:] = b"\x00" * 20  # same size, different bytes
    f.write_bytes(bytes(data))
    whiten.svd_counter.reset()
    again = decompose_all(weights, grams, DecompositionCache("k2", root=tmp_path), progress=False)
    assert whiten.svd_counter.count == 1  # only the corrupt entry
    assert "checksum mismatch" in caplog.text
    assert torch.allclose(again[victim].sigma, ref[victim].sigma)


def test_compress_reuses_cache_for_a_second_budget(tmp_cache):
    common = dict(calib="generated", calib_n=16, calib_max_length=64, allocator="deft", group=4)
    whiten.svd_counter.reset()
    lm = load_model("tiny")
    compress_model(DecompositionConfig(keep=0.8, **common), lm)
    assert whiten.svd_counter.count == 14  # 2 blocks x 7 matrices
    whiten.svd_counter.reset()
    lm2 = load_model("tiny")
    model, report = compress_model(DecompositionConfig(keep=0.6, **common), lm2)
    assert whiten.svd_counter.count == 0
    a = report["allocation"]
    assert a.params_kept <= 0.6 * a.params_dense
    assert report["params_after"] < report["params_before"]


def test_whole_model_budget_keeps_that_fraction_of_every_parameter(tmp_cache):
    common = dict(calib="generated", calib_n=16, calib_max_length=64, allocator="uniform", keep=0.8)
    _, linears = compress_model(DecompositionConfig(**common), load_model("tiny"))
    model, whole = compress_model(DecompositionConfig(keep_of="model", **common), load_model("tiny"))
    a = whole["allocation"]
    other = whole["params_before"] - a.params_dense  # embeddings, norms, LM head: all kept
    assert a.keep_fraction < 0.8  # everything outside the linears is kept, so the linears give up more
    assert (other + a.params_kept) / whole["params_before"] <= 0.8
    assert a.keep_fraction < linears["allocation"].keep_fraction
    assert whole["params_after"] == sum(p.numel() for p in model.parameters())
    from deftlab.recipes.compress import allocation_metrics
    m = allocation_metrics(a, whole["params_before"])
    assert m["keep_fraction_model"] == pytest.approx((other + a.params_kept) / whole["params_before"])
    assert m["keep_fraction_model"] > 0.8 - 0.02  # uniform ranks land close below the target


def test_compress_config_needs_exactly_one_budget():
    # checked once, in DecompositionConfig, whichever run config nests it
    with pytest.raises(DeftlabError, match="exactly one of"):
        CompressConfig.from_params({"allocator": "deft"})
    with pytest.raises(DeftlabError, match="exactly one of"):
        CompressConfig.from_params({"allocator": "uniform", "keep": 0.5, "err": 0.2})
    with pytest.raises(DeftlabError, match="unknown param"):
        CompressConfig.from_params({"allocator": "uniform", "keep": 0.5, "budget": 3})
    with pytest.raises(DeftlabError, match="not one of"):
        CompressConfig.from_params({"allocator": "uniform", "keep": 0.5, "keep_of": "all"})
    cfg = CompressConfig.from_params({"allocator": "uniform", "keep": 0.5, "ppl": ["wikitext2"], "model": "tiny"})
    assert (cfg.decomposition.keep, cfg.perplexity.ppl, cfg.model.model) == (0.5, ("wikitext2",), "tiny")


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_keeps_the_entries_already_written(tmp_path, monkeypatch, workers):
    from deftlab.decompose import cache as cache_mod

    monkeypatch.setattr(cache_mod, "INDEX_EVERY", 1e9)  # only the final flush writes the index
    weights, grams = _problem()
    bad = dict(weights)
    last = list(weights)[-1]
    bad[last] = weights[last].clone()
    bad[last][0, 0] = float("nan")
    with pytest.raises(DeftlabError, match="NaN"):
        decompose_all(bad, grams, DecompositionCache("k3", root=tmp_path), progress=False, workers=workers)
    whiten.svd_counter.reset()
    decompose_all(weights, grams, DecompositionCache("k3", root=tmp_path), progress=False)
    assert whiten.svd_counter.count == 1  # only the matrix that failed


def test_parallel_tasks_match_sequential_and_restore_threads(tmp_path):
    weights, grams = _problem()
    shared = next(iter(grams.values()))
    grams = {n: shared for n in weights}  # one Gram for all three: one task, one Cholesky
    grams["extra"] = torch.eye(16, dtype=torch.float64) * 3.0
    weights["extra"] = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    seq = decompose_all(weights, grams, None, progress=False, workers=1)
    whiten.svd_counter.reset()
    par = decompose_all(weights, grams, DecompositionCache("k5", root=tmp_path), progress=False, workers=2)
    assert whiten.svd_counter.count == 4
    assert torch.get_num_threads() == threads
    assert list(par) == list(weights)  # input order, whatever order the tasks finished in
    for n in weights:
        torch.testing.assert_close(par[n].sigma, seq[n].sigma, rtol=1e-10, atol=1e-12)
    assert set(DecompositionCache("k5", root=tmp_path).index["entries"]) == set(weights)


def test_entry_without_checksum_is_recomputed(tmp_path, caplog):
    weights, grams = _problem()
    cache = DecompositionCache("k4", root=tmp_path)
    decompose_all(weights, grams, cache, progress=False)
    first = next(iter(weights))
    del cache.index["entries"][first]["crc32"]
    cache._dirty = True
    cache.flush()
    whiten.svd_counter.reset()
    decompose_all(weights, grams, DecompositionCache("k4", root=tmp_path), progress=False)
    assert whiten.svd_counter.count == 1 and "no checksum recorded" in caplog.text


_SHARD_SCRIPT = """
import sys, torch
from pathlib import Path
from deftlab.decompose.cache import DecompositionCache
from deftlab.decompose.driver import decompose_all
from deftlab.models.tiny import tiny_llama
from deftlab.decompose.targets import target_linears
weights = {n: m.weight.detach() for n, m in target_linears(tiny_llama(num_hidden_layers=4)).items()}
i, n = int(sys.argv[2]), int(sys.argv[3])
decompose_all(weights, None, DecompositionCache("k", root=Path(sys.argv[1])), shard=(i, n), workers=1,
              progress=False)
"""


def test_two_processes_fill_one_cache_with_one_processs_entries(tmp_path):
    """Sharded decomposition: 2 processes at once, one cache (its index merged under a file lock), give the same
    entries, bit for bit, as one process; a later unsharded call computes nothing."""
    import os
    import subprocess
    import sys

    from deftlab.decompose.targets import target_linears
    from deftlab.models.tiny import tiny_llama

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _SHARD_SCRIPT, str(tmp_path / "two"), str(i), "2"], env=env)
             for i in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    # the reference: one process, same thread count (LAPACK's results depend on it)
    subprocess.run([sys.executable, "-c", _SHARD_SCRIPT, str(tmp_path / "one"), "0", "1"], env=env, check=True)
    weights = {n: m.weight.detach() for n, m in target_linears(tiny_llama(num_hidden_layers=4)).items()}
    one, two = DecompositionCache("k", root=tmp_path / "one"), DecompositionCache("k", root=tmp_path / "two")
    assert set(two.index["entries"]) == set(one.index["entries"]) == set(weights)
    for name in weights:
        dec, got = one.get(name), two.get(name)
        assert torch.equal(got.sigma, dec.sigma) and torch.equal(got.U, dec.U), name
    calls = []
    real = whiten.whitened_svd
    try:
        whiten.whitened_svd = lambda *a, **k: calls.append(1) or real(*a, **k)
        decompose_all(weights, None, two, progress=False)
    finally:
        whiten.whitened_svd = real
    assert not calls


def test_shards_split_whole_gram_groups():
    torch.manual_seed(0)
    g1, g2, g3 = (torch.eye(8, dtype=torch.float64) * (i + 1) for i in range(3))
    weights = {n: torch.randn(8, 8) for n in ("q", "k", "v", "o", "gate", "up", "down")}
    grams = {"q": g1, "k": g1, "v": g1, "o": g2, "gate": g3, "up": g3, "down": g2.clone()}
    parts = [set(decompose_all(weights, grams, None, shard=(i, 2), workers=1, progress=False)) for i in (0, 1)]
    assert parts[0] | parts[1] == set(weights) and not parts[0] & parts[1]
    assert {"q", "k", "v"} <= parts[0] or {"q", "k", "v"} <= parts[1]  # one Cholesky factor, one process
    assert {"gate", "up"} <= parts[0] or {"gate", "up"} <= parts[1]
