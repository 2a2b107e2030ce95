"""Update extraction (LoRA / full / DeFT), task gradients, budgets, export/apply (CLI) and the osd run kind."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from deftlab.adapters import AdapterConfig, attach
from deftlab.delta import extract as ex
from deftlab.delta.codecs import CODECS, budget_bytes, encode
from deftlab.delta.storage import load_delta, save_delta
from deftlab.errors import BudgetError, DataNotFoundError, DeftlabError
from deftlab.models.tiny import tiny_llama
from deftlab.surgery import LowRankLinear
from deftlab.surgery.replace import get_parent

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
K1 = "model.layers.1.self_attn.k_proj"
DOWN1 = "model.layers.1.mlp.down_proj"
R, ALPHA = 4, 16.0  # s = 4, so a missing scaling shows


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(1)


def _lora(model, targets=("q_proj", "v_proj"), seed=1):
    pm = attach(model, AdapterConfig(kind="lora", r=R, alpha=ALPHA, dropout=0.0, target_modules=targets,
                                     init="vanilla"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # PEFT starts B at 0; a trained B is not
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return pm.eval()


def _decompose(model, names, rank=8):
    for name in names:
        parent, attr = get_parent(model, name)
        W = getattr(parent, attr).weight.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        setattr(parent, attr, LowRankLinear.from_factors((U[:, :rank] * S[:rank]).contiguous(),
                                                         Vh[:rank].contiguous(), requires_grad=False))
    return model


def _full_ft(base, norm=True):
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in (K1, DOWN1, "lm_head"):  # lm_head is tied to embed_tokens
            w = ft.get_submodule(name).weight
            w.add_(0.02 * torch.randn(w.shape, generator=g))
        if norm:
            ft.model.norm.weight.mul_(1.1)
    return ft


def _deft(base_seed=0):
    model = _decompose(tiny_llama(seed=base_seed), [Q0, DOWN1])
    return _lora(model)  # LoRA on q_proj (LowRankLinear in layer 0) and v_proj (dense)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- extraction ------------------------------------------------------------------------------------------------
def test_lora_delta_is_scaled_BA():
    base, ft = tiny_llama(seed=0), _lora(tiny_llama(seed=0))
    ups = ex.extract_updates(base, ft)
    assert set(ups) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert set(ex.update_kinds(base, ft).values()) == {"lora"}
    layer = ft.get_base_model().get_submodule(Q0)
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    torch.testing.assert_close(ups[Q0], (ALPHA / R) * B.detach() @ A.detach(), rtol=0, atol=1e-7)
    assert ups[Q0].abs().max() > 1e-3
    assert ex.extract_extras(base, ft) == {}


def test_full_ft_delta_is_weight_difference_with_tied_weights_once():
    base = tiny_llama(seed=0)
    ft = _full_ft(base)
    ups = ex.extract_updates(base, ft)
    # lm_head is tied to embed_tokens: one update, under the first name
    assert set(ups) == {K1, DOWN1, "model.embed_tokens"}
    assert set(ex.update_kinds(base, ft).values()) == {"dense"}
    for name in (K1, DOWN1):
        torch.testing.assert_close(ups[name], ft.get_submodule(name).weight - base.get_submodule(name).weight,
                                   rtol=0, atol=0)
    extras = ex.extract_extras(base, ft)
    assert set(extras) == {"model.norm.weight"}
    torch.testing.assert_close(extras["model.norm.weight"], 0.1 * base.model.norm.weight.detach())


def test_deft_delta_is_factors_plus_lora_minus_original_weight():
    base, ft = tiny_llama(seed=0), _deft()
    ups = ex.extract_updates(base, ft)
    kinds = ex.update_kinds(base, ft)
    assert kinds[Q0] == "lowrank+lora" and kinds[DOWN1] == "lowrank" and kinds[V0] == "lora"
    q = ft.get_base_model().get_submodule(Q0)
    lr = q.get_base_layer()
    assert isinstance(lr, LowRankLinear)
    W = base.get_submodule(Q0).weight.detach()
    expect = (lr.u_proj.weight @ lr.v_proj.weight + (ALPHA / R) * q.lora_B["default"].weight
              @ q.lora_A["default"].weight - W).detach()
    torch.testing.assert_close(ups[Q0], expect, rtol=1e-5, atol=1e-6)
    down = ft.get_base_model().get_submodule(DOWN1)
    torch.testing.assert_close(ups[DOWN1], (down.dense_weight() - base.get_submodule(DOWN1).weight).detach(),
                               rtol=1e-5, atol=1e-6)
    assert ups[DOWN1].norm() > 1e-2  # the truncation error of a rank-8 factorisation is not negligible


@pytest.mark.parametrize("which", ["lora", "full", "deft"])
def test_applying_stored_updates_reproduces_finetuned_logits(which, tmp_path):
    base = tiny_llama(seed=0)
    ft = {"lora": lambda: _lora(tiny_llama(seed=0)), "full": lambda: _full_ft(base), "deft": _deft}[which]()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    target = _logits(ft, ids)
    assert (target - _logits(base, ids)).abs().max() > 1e-3  # the update matters
    # lowrank at full rank (min(n, d)) is exact; store, reload and apply through the file
    ups = ex.extract_updates(base, ft)
    encoded = {n: encode("lowrank", d, (d.shape[0] + d.shape[1]) * min(d.shape) * 4) for n, d in ups.items()}
    assert all(e.meta["rank"] == min(e.shape) for e in encoded.values())
    path = save_delta(tmp_path / "d.safetensors", encoded, {"run_id": which})
    rebuilt = copy.deepcopy(base)
    if which == "full":  # the norm change travels in the extras companion that export_updates writes
        report = ex.export_updates(rebuilt, ft, "lowrank", 10**8, tmp_path / "e.safetensors")
        assert report.extras == ["model.norm.weight"] and report.extra_nbytes == 64 * 4
        path = report.path
    model, meta = ex.apply_stored(rebuilt, path)
    assert model is rebuilt
    torch.testing.assert_close(_logits(model, ids), target, rtol=0, atol=1e-4)


# --- gradients -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_task():
    from deftlab.tasks import get_task

    return get_task("generated", n_train=32, n_test=8)


def test_task_gradients_match_autograd_and_restore_state(gen_task):
    from deftlab.models.tiny import TinyTokenizer
    from deftlab.train.module import masked_lm_loss

    model = tiny_llama(seed=0)
    batches = ex.gradient_batches(gen_task, TinyTokenizer(), n_batches=2, batch_size=2, cutoff_len=320)
    assert len(batches) == 2
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = ex.task_gradients(model, batches, [Q0, DOWN1])
    w = model.get_submodule(Q0).weight
    loss = sum(masked_lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["labels"])[0] for b in batches) / len(batches)
    (expect,) = torch.autograd.grad(loss, [w])
    torch.testing.assert_close(grads[Q0], expect, rtol=1e-4, atol=1e-7)
    assert grads[Q0].abs().max() > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(DeftlabError, match="no float weight"):
        ex.task_gradients(model, batches, ["model.norm.nothing"])


def test_gradients_at_points_differ_and_leave_base_unchanged(gen_task):
    from deftlab.models.tiny import TinyTokenizer

    base, ft = tiny_llama(seed=0), _full_ft(tiny_llama(seed=0), norm=False)
    ups = ex.extract_updates(base, ft)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    batches = ex.gradient_batches(gen_task, TinyTokenizer(), n_batches=1, batch_size=2, cutoff_len=320)
    g_base = ex.gradients_at(base, ups, batches, "base")
    g_ft = ex.gradients_at(base, ups, batches, "finetuned")
    g_tr = ex.gradients_at(base, ups, batches, "truncated", {n: 600 for n in ups})
    assert ex.gradients_at(base, ups, batches, "none") is None
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert not torch.allclose(g_base[K1], g_ft[K1]) and not torch.allclose(g_tr[K1], g_ft[K1])
    torch.testing.assert_close(g_base[K1], ex.task_gradients(base, batches, [K1])[K1])


# --- budgets ---------------------------------------------------------------------------------------------------
def _synthetic_updates():
    g = torch.Generator().manual_seed(3)
    out = {}
    for i, (n, d) in enumerate([(64, 64), (32, 64), (64, 160)]):
        low = torch.randn(n, 4, generator=g) @ torch.randn(4, d, generator=g)
        out[f"m{i}"] = low + 0.05 * torch.randn(n, d, generator=g)
    return out


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_budgets_respected_per_matrix_and_in_total(codec, tmp_path):
    ups = _synthetic_updates()
    grads = {n: torch.randn(d.shape, generator=torch.Generator().manual_seed(4)) for n, d in ups.items()}
    enc, stats, dec = ex.compress_updates(ups, codec, "5%", grads=grads, keep_decoded=True)
    for r in stats.rows:
        assert r["budget_bytes"] == budget_bytes(tuple(r["shape"]), "5%")
        assert 0 < r["nbytes"] <= r["budget_bytes"]
    assert stats.nbytes <= stats.budget_bytes == sum(budget_bytes(tuple(d.shape), 0.05) for d in ups.values())
    assert 0 < stats.rel_error < 1 and set(dec) == set(ups)
    # an absolute total, split in proportion to matrix sizes
    total = 9000
    enc, stats, _ = ex.compress_updates(ups, codec, total)
    assert stats.nbytes <= stats.budget_bytes <= total
    numel = {n: d.numel() for n, d in ups.items()}
    for r in stats.rows:
        assert r["budget_bytes"] == total * numel[r["name"]] // sum(numel.values())
    _, meta = save_delta(tmp_path / "x.safetensors", enc), None
    loaded, _ = load_delta(tmp_path / "x.safetensors")
    assert sum(e.nbytes for e in loaded.values()) == stats.nbytes <= total


def test_budget_parsing_and_reference():
    assert ex.parse_budget("2%") == ("fraction", 0.02)
    assert ex.parse_budget(0.05) == ("fraction", 0.05)
    assert ex.parse_budget(1_000_000) == ("bytes", 1_000_000)
    assert ex.parse_budget("123456") == ("bytes", 123456)
    assert ex.parse_budget("full") == ("full", None) and ex.parse_budget(1.0) == ("full", None)
    for bad in ("two%", -3, True, None, "150%"):
        with pytest.raises(DeftlabError):
            ex.parse_budget(bad)
    ups = _synthetic_updates()
    enc, stats, dec = ex.compress_updates(ups, "none", "2%", keep_decoded=True)
    assert enc == {} and stats.rel_error == 0.0 and stats.nbytes == stats.dense_nbytes
    assert all(torch.equal(dec[n], ups[n]) for n in ups)
    with pytest.raises(BudgetError, match="m0"):
        ex.compress_updates(ups, "lowrank", "0.1%")  # below one rank of a 64×64 matrix


def test_fingerprint_mismatch_and_missing_extras(tmp_path):
    from deftlab.models import load_model

    base, ft = tiny_llama(seed=0), _full_ft(tiny_llama(seed=0))
    lm = load_model("tiny")
    report = ex.export_updates(lm, ft, "sparse", "50%", tmp_path / "d.safetensors")
    assert report.metadata["base_fingerprint"] == lm.fingerprint
    lm.fingerprint = "other"
    with pytest.raises(DeftlabError, match="exported against base weights"):
        ex.apply_stored(lm, report.path)
    ex.extras_path(report.path).unlink()
    with pytest.raises(DataNotFoundError, match="companion"):
        ex.apply_stored(base, report.path)
    with pytest.raises(DeftlabError, match="codec 'none'"):
        ex.export_updates(base, ft, "none", "2%", tmp_path / "n.safetensors")


# --- real tiny fine-tuning runs (deftlab.recipes.finetune, recorded in a store), exported and applied ----------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from deftlab.experiments.runner import execute, make_spec
    from deftlab.store import ResultsStore

    root = tmp_path_factory.mktemp("finetune")
    store = ResultsStore(root / "results")
    common = {"model": "tiny", "task": "generated", "profile": "smoke", "eval_limit": 2, "max_new_tokens": 4}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFTLAB_CACHE", str(root / "cache"))
        mp.setenv("WANDB_MODE", "disabled")
        # keep 0.5 decomposes a LoRA target (layer 1 q_proj), so the DeFT run has LoRA over LowRankLinear
        for name, params in (("lora", {**common, "method": "dense", "adapter": "lora", "lr": 2e-2}),
                             ("deft", {**common, "method": "deft", "keep": 0.5, "calib_n": 8, "lr": 2e-2})):
            spec = make_spec("finetune", params)
            execute(spec, store, options={"progress": False})
            out[name] = store.run_dir(spec.kind, spec.key)
    return out


def test_real_deft_run_updates_rebuild_the_merged_model(runs, tmp_path):
    from deftlab.models import load_model
    from deftlab.recipes.finetune import load_finetuned

    lm, ft = load_finetuned(runs["deft"])
    kinds = ex.update_kinds(load_model("tiny").model, ft)
    assert {"lowrank+lora", "lowrank", "lora"} <= set(kinds.values())
    report = ex.export_updates(load_model("tiny"), ft, "lowrank", 10**8, tmp_path / "d.safetensors")
    assert report.stats.rel_error < 1e-5 and report.extras == []
    _, merged = load_finetuned(runs["deft"], merge=True)
    model, meta = ex.apply_stored(load_model("tiny"), report.path)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(model, ids), _logits(merged, ids), rtol=0, atol=1e-4)
    assert meta["kinds"] == kinds


def test_cli_export_apply_round_trip(runs, tmp_path, capsys):
    from deftlab.cli import main
    from deftlab.models import load_model
    from deftlab.recipes.finetune import load_finetuned

    run = runs["lora"]
    out = tmp_path / "lr.safetensors"
    assert main(["delta", "export", str(run), "--codec", "lowrank", "--budget", "25%", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "codec lowrank" in text and "relative error" in text and out.is_file()
    assert main(["delta", "apply", str(out), "--model", "tiny", "--eval", "generated", "--limit", "2",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "applied 4 updates to tiny" in text and "generated/generated" in text
    assert (tmp_path / "ev" / "metrics.json").is_file()
    # a rank-4 LoRA fits in 25 % at full LoRA rank: the rebuilt dense model is the fine-tuned one
    _, ft = load_finetuned(run)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model, meta = ex.apply_stored(load_model("tiny"), out)
    assert meta["run_id"] == run.name and meta["codec"] == "lowrank" and meta["base_model"] == "tiny"
    torch.testing.assert_close(_logits(model, ids), _logits(ft, ids), rtol=0, atol=1e-4)
    assert (_logits(ft, ids) - _logits(load_model("tiny").model, ids)).abs().max() > 1e-3
    # osd with task gradients (the run's task) under a tight budget
    osd = tmp_path / "osd.safetensors"
    assert main(["delta", "export", str(run), "--codec", "osd", "--budget", "8%", "--out", str(osd),
                 "--grad-batches", "1", "--cutoff-len", "320"]) == 0
    enc, meta = load_delta(osd)
    assert meta["grad_at"] == "base" and all(e.meta["score"] == "taylor" for e in enc.values())
    assert all(e.nbytes <= budget_bytes(e.shape, "8%") for e in enc.values())
    assert main(["delta", "export", str(tmp_path / "missing")]) == 2  # one-line error, not a traceback
    # a run key (prefix) works as well as its directory
    by_key = tmp_path / "k.safetensors"
    assert main(["delta", "export", run.name[:8], "--results", str(run.parent.parent), "--codec", "lowrank",
                 "--budget", "25%", "--out", str(by_key)]) == 0 and by_key.is_file()


def test_run_osd_kind(runs, tmp_path, monkeypatch):
    from deftlab.recipes.osd import resolve_finetune, run_osd
    from deftlab.store import read_record

    run = runs["lora"]
    ft_avg = read_record(run)["metrics"]["avg"]
    common = {"finetune": str(run), "profile": "smoke", "task": "generated", "model": "tiny", "eval_limit": 2,
              "max_new_tokens": 4, "grad_batches": 1}
    (tmp_path / "a").mkdir()
    m = run_osd({**common, "codec": "osd", "budget": 0.1}, tmp_path / "a")
    assert 0 < m["rel_error"] < 1 and m["n_matrices"] == 4 and m["ft_avg"] == ft_avg
    assert m["nbytes"] <= m["budget_bytes"] <= 0.1 * m["dense_nbytes"]
    assert 0 <= m["acc_generated"] <= 1 and m["avg"] == m["acc_generated"] and m["eval_n"] == 2
    assert {"delta.safetensors", "per_matrix.csv", "eval"} <= {p.name for p in (tmp_path / "a").iterdir()}
    (tmp_path / "b").mkdir()
    ref = run_osd({**common, "codec": "none", "budget": "full"}, tmp_path / "b")
    assert ref["rel_error"] == 0 and ref["nbytes"] == ref["dense_nbytes"]
    # the uncompressed reference rebuilds the fine-tuned model: same predictions as the run's own evaluation
    ours = [json.loads(x)["output"] for x in (tmp_path / "b" / "eval" / "generated.predictions.jsonl").open()]
    theirs = [json.loads(x)["output"] for x in (run / "eval" / "generated.predictions.jsonl").open()]
    assert ours == theirs and ref["avg"] == ft_avg
    with pytest.raises(DeftlabError, match="unknown param"):
        run_osd({**common, "codec": "osd", "budget": 0.1, "bogus": 1}, tmp_path / "c")
    with pytest.raises(DeftlabError, match="model 'smollm2-135m'"):
        run_osd({**common, "model": "smollm2-135m", "codec": "osd", "budget": 0.1}, tmp_path / "c")
    # finetune given as params: located by the runner's key in the results store
    from deftlab.experiments.runner import make_spec
    from deftlab.store import ResultsStore

    monkeypatch.setenv("DEFTLAB_RESULTS", str(tmp_path / "results"))
    fparams = {"model": "tiny", "task": "generated", "method": "dense", "adapter": "lora", "profile": "smoke"}
    with pytest.raises(DataNotFoundError, match="not recorded"):
        resolve_finetune(fparams)
    spec = make_spec("finetune", fparams)
    store = ResultsStore()
    lease = store.claim(spec.kind, spec.key)  # a fabricated test record, through the store
    store.commit(spec.kind, spec.key, lease, params=fparams, metrics={"avg": 0.5}, fingerprint=spec.fingerprint)
    d = store.run_dir("finetune", spec.key)
    assert resolve_finetune(fparams) == (d, {"params": fparams, "metrics": {"avg": 0.5}})
    assert resolve_finetune({"ref": {"kind": "finetune", "params": fparams}})[0] == d
    assert resolve_finetune({"ref": "finetune/x", "dir": str(run), "params": {}, "metrics": {}})[0] == run
