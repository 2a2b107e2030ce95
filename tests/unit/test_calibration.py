import pytest
import torch

from deftlab.decompose.calibration import CalibrationStats, collect_statistics, token_batches
from deftlab.errors import CacheCorruptError
from deftlab.models.tiny import TinyTokenizer, tiny_llama


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_llama(), TinyTokenizer()
    texts = [f"question {i}: " + "ab" * (i % 5 + 1) for i in range(16)]
    batches = list(token_batches(tok, texts, batch_size=4, max_length=64))
    return model, batches


def _direct_gram(model, batches, module):
    xs = []
    h = module.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    g = 0
    for x, b in zip(xs, batches):
        v = x.reshape(-1, x.shape[-1])[b["attention_mask"].reshape(-1).bool()].double()
        g = g + v.T @ v
    return g


def test_grams_match_direct_computation_and_exclude_padding(setup):
    model, batches = setup
    st = collect_statistics(model, batches, progress=False)
    assert st.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding really present
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        mod = model.get_submodule(name)
        g = _direct_gram(model, batches, mod)
        # per-batch products are fp32 (by design), accumulated in fp64
        assert ((st.gram(name) - g).norm() / g.norm()).item() < 1e-6
        assert st.gram(name).dtype == torch.float64


def test_siblings_share_one_gram(setup):
    model, batches = setup
    st = collect_statistics(model, batches, progress=False)
    assert len(st.grams) == 4 * 2  # per block: qkv, o, gate/up, down
    p = "model.layers.0."
    assert st.gram_of[p + "self_attn.k_proj"] == st.gram_of[p + "self_attn.q_proj"] == st.gram_of[p + "self_attn.v_proj"]
    assert st.gram_of[p + "mlp.up_proj"] == st.gram_of[p + "mlp.gate_proj"]
    assert st.gram_of[p + "self_attn.o_proj"] != st.gram_of[p + "self_attn.q_proj"]


def test_outlier_ratio_matches_definition(setup):
    model, batches = setup
    padded = next(b for b in batches if (b["attention_mask"] == 0).any())  # padding must not count
    st = collect_statistics(model, [padded], threshold=2.0, progress=False)
    outs = []
    mod = model.get_submodule("model.layers.0.mlp.down_proj")
    h = mod.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with torch.no_grad():
        model(**padded)
    h.remove()
    a = outs[0].reshape(-1, outs[0].shape[-1])[padded["attention_mask"].reshape(-1).bool()].abs()
    expected = (a > 2.0 * a.mean()).float().mean().item()
    assert expected > 0
    assert st.alpha["model.layers.0.mlp.down_proj"] == pytest.approx(expected, rel=1e-6)


def test_stats_roundtrip_and_truncation_detected(setup, tmp_path):
    model, batches = setup
    st = collect_statistics(model, batches, progress=False)
    st.save(tmp_path / "s")
    back = CalibrationStats.load(tmp_path / "s")
    assert back.gram_of == st.gram_of and back.alpha == st.alpha
    assert all(torch.equal(back.grams[k], st.grams[k]) for k in st.grams)
    f = tmp_path / "s" / "grams.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CacheCorruptError, match="truncated"):
        CalibrationStats.load(tmp_path / "s")


def test_calibration_runs_the_backbone_only(setup):
    from deftlab.decompose.calibration import calibration_body

    model, batches = setup
    calls = []
    h = model.lm_head.register_forward_hook(lambda m, a, o: calls.append(1))
    collect_statistics(model, batches[:1], progress=False)
    h.remove()
    assert calls == []  # no logits computed
    assert calibration_body(model, [model.model.layers[0].mlp.up_proj]) is model.model
    assert calibration_body(model, [model.lm_head]) is model  # a target outside the backbone: whole model


def test_outlier_counts_pool_over_batches_of_different_shapes(setup):
    """Several padded batches of different lengths (the collector reuses its buffers across them): α is the
    pooled count of |A| > T·(that batch's mean) over non-padding entries, for every target."""
    model, batches = setup
    st = collect_statistics(model, batches, threshold=2.0, progress=False)
    names = list(st.alpha)
    outs = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs[n].append(o.detach()))
          for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hs:
        h.remove()
    for n in names:
        count = entries = 0
        for o, b in zip(outs[n], batches):
            a = o.reshape(-1, o.shape[-1])[b["attention_mask"].reshape(-1).bool()].abs()
            count += int((a > 2.0 * (a.sum() / a.numel())).sum())
            entries += a.numel()
        assert st.alpha[n] == pytest.approx(count / entries, rel=1e-6, abs=1e-9), n
