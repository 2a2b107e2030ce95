import pytest
import torch

from deftlab.decompose import whiten
from deftlab.decompose.cache import DecompositionCache, decompose_all
from deftlab.decompose.pipeline import CompressConfig, compress_model
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
    common = dict(model="tiny", calib="generated", calib_n=16, calib_max_length=64, allocator="deft", group=4,
                  ppl=[])
    whiten.svd_counter.reset()
    lm = load_model("tiny")
    compress_model(CompressConfig(keep=0.8, **common), loaded=lm)
    assert whiten.svd_counter.count == 14  # 2 blocks x 7 matrices
    whiten.svd_counter.reset()
    lm2 = load_model("tiny")
    model, report = compress_model(CompressConfig(keep=0.6, **common), loaded=lm2)
    assert whiten.svd_counter.count == 0
    a = report["allocation"]
    assert a.params_kept <= 0.6 * a.params_dense
    assert report["params_after"] < report["params_before"]


def test_compress_config_needs_exactly_one_budget():
    with pytest.raises(DeftlabError, match="exactly one of"):
        CompressConfig(allocator="deft").validate()
    with pytest.raises(DeftlabError, match="exactly one of"):
        CompressConfig(allocator="uniform", keep=0.5, err=0.2).validate()
