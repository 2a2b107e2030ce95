"""WeLore Tables 2-7 and Figure 6: each `paper` preset runs the paper's experiment, and its table prints every
number the YAML enters from the paper (same style as test_paper_presets.py).

Expected settings are read from ../shared/papers/welore.txt (line numbers cited per item). They are compared
with the *resolved* configs of the runs the paper preset plans (what a run would record), not with the YAMLs.
"""

from collections import Counter

import pytest

from deftlab.experiments.kinds import get_kind
from deftlab.experiments.registry import load_all
from deftlab.experiments.runner import expand
from deftlab.experiments.tables import build_table
from deftlab.store import ResultsStore

D = None  # dense: no decomposition
L7, L13, CHAT = "llama2-7b", "llama2-13b", "llama2-7b-chat"
ERR_1_5 = (0.1, 0.2, 0.3, 0.4, 0.5)


def _compress(model, allocator, svd, err, ppl, calib="-", min_ratio=0.0):
    return ("compress", model, allocator, svd, err, min_ratio, ppl, calib)


def _finetune(model, method, adapter, optimizer, err, profile):
    return ("finetune", model, method, adapter, optimizer, err, profile)


PAPER = {
    # Table 2 (l. 185-193; §5.2.1 ⑤; App. A.1 l. 315: "Wikitext-2 serves as the calibration dataset"): LLaMa2-7B,
    # PPL on C4, ERR 10-50%, Uniform (plain SVD), Uniform+ActSVD, and the WeLore+ActSVD column the caption names
    "welore-table2": Counter(
        [_compress(L7, "uniform", "plain", e, ("c4",)) for e in ERR_1_5]
        + [_compress(L7, a, "whitened", e, ("c4",), "wikitext2") for a in ("uniform", "welore") for e in ERR_1_5]),
    # Table 3 (l. 171-178): LLaMa-2 7B dense (0%) and WeLore 30/50/70%, seqlen 512/1024/2048/4096
    "welore-table3": Counter(("efficiency", L7, m, e, c) for m, e in (("dense", D), ("welore", 0.3), ("welore", 0.5),
                                                                    ("welore", 0.7)) for c in (512, 1024, 2048, 4096)),
    # Table 4 (l. 197-206; §5.2.2 ① l. 210; Table 8 l. 353-365): LLaMa-2 7B and 13B, WeLore at 30/50/60/70%,
    # continual fine-tuning with LoRA / GaLore / WeLore (LRCs) at Table 8's settings, plus the compressed models
    "welore-table4": Counter(
        [_finetune(m, "welore", a, o, e, "welore-continual") for m in (L7, L13) for e in (0.3, 0.5, 0.6, 0.7)
         for a, o in (("lora", "adamw"), ("full", "galore"), ("lrc", "adamw"))]
        + [_compress(m, "welore", "plain", e, ("c4",)) for m in (L7, L13) for e in (0.3, 0.5, 0.6, 0.7)]),
    # Table 5 (l. 217-233): LLaMa-2 7B, dense Full / LoRA / GaLore; 30/40/50% × Full / LoRA / GaLore / WeLore
    "welore-table5": Counter(
        [_finetune(L7, "dense", a, o, D, "paper") for a, o in (("full", "adamw"), ("lora", "adamw"), ("full", "galore"))]
        + [_finetune(L7, "welore", a, o, e, "paper") for e in (0.3, 0.4, 0.5)
           for a, o in (("full", "adamw"), ("lora", "adamw"), ("full", "galore"), ("lrc", "adamw"))]),
    # Table 6 (l. 305-313, App. A.1): LLaMa2-chat-7B, WikiText-2 PPL, ERR 10-50%, Uniform / WeLore × plain /
    # ActSVD calibrated on WikiText-2 (l. 315)
    "welore-table6": Counter(
        [_compress(CHAT, a, "plain", e, ("wikitext2",)) for a in ("uniform", "welore") for e in ERR_1_5]
        + [_compress(CHAT, a, "whitened", e, ("wikitext2",), "wikitext2") for a in ("uniform", "welore")
           for e in ERR_1_5]),
    # Table 7 (l. 345-351, App. A.3): thresholds for LLaMa-2 7B and 13B at 10-70%; our τ in both accountings
    # (every reduced matrix counts / N-LRCs at full rank); the first row's runs also measure C4 (Table 1's runs)
    "welore-table7": Counter(
        [_compress(m, "welore", "plain", e, ("c4",)) for m in (L7, L13) for e in ERR_1_5 + (0.6, 0.7)]
        + [_compress(m, "welore", "plain", e, (), min_ratio=0.4999) for m in (L7, L13) for e in ERR_1_5 + (0.6, 0.7)]),
    # Figure 6 (l. 153, 158): LLaMa-2 7B at 50% ERR, WeLore ranks (plain torch.svd, l. 141)
    "welore-fig6": Counter([_compress(L7, "welore", "plain", 0.5, ("c4",))]),
}
# printed paper cells entered per experiment (l. numbers of the printed tables)
ENTERED = {
    "welore-table2": 8,    # l. 187-193: Uniform 3 (NaN at 40/50%) + Uniform+ActSVD 5; no WeLore+ActSVD column
    "welore-table3": 24,   # l. 173-178: 4 rows × (Total Params, Model Memory, 4 seqlens)
    "welore-table4": 56,   # l. 199-204: Compressed Params 8 + 3 methods × 8 × (PPL, GPU MB)
    "welore-table5": 15,   # l. 219-233: the SVAMP column (the other tasks have no data here)
    "welore-table6": 19,   # l. 307-311: 20 cells, Uniform 30% "nan"
    "welore-table7": 14,   # l. 347-349: 2 models × 7 levels
    "welore-fig6": 0,      # a plot: no numbers printed
}


def _key(spec):
    cfg = get_kind(spec.kind).resolved_config(spec.params)
    model = cfg["model"]["model"]
    d = cfg.get("decomposition")
    if spec.kind == "compress":
        data_aware = d["svd"] == "whitened" or d["allocator"] == "owl"
        return _compress(model, d["allocator"], d["svd"], d["err"], tuple(cfg["perplexity"]["ppl"]),
                         d["calib"] if data_aware else "-", d["welore_min_ratio"])
    if spec.kind == "finetune":
        return _finetune(model, cfg["method"], cfg["adapter"], cfg["optimizer"], d["err"] if d else D, cfg["profile"])
    return ("efficiency", model, cfg["method"], d["err"] if d else D, cfg["context_len"])


@pytest.fixture(scope="module")
def experiments():
    return load_all()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_runs_the_papers_experiment(experiments, name):
    specs = expand(experiments[name], "paper")
    assert Counter(_key(s) for s in specs) == PAPER[name]
    assert len({s.ref for s in specs}) == len(specs)  # no run planned twice


def _matches(spec, row: dict) -> bool:
    def val(k):
        return spec.labels.get(k) if k.startswith("_") else spec.params.get(k)

    return all(val(k) == v or (isinstance(v, float) and isinstance(val(k), (int, float)) and abs(val(k) - v) < 1e-9)
               for k, v in row.items())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_reference_cell_names_its_source_and_is_printed_by_the_paper_table(experiments, name, tmp_path):
    exp = experiments[name]
    ref = exp.reference
    assert sum(len(e.values) for e in ref.entries) == ENTERED[name]
    if not ref.entries:
        assert "prints no numbers" in ref.note and ref.claims
    specs = expand(exp, "paper")
    item = exp.source.item  # "Table 5" / "Figure 6"
    for e in ref.entries:
        assert e.source and e.source.startswith(f"WeLore {item},"), e  # table, then row / column / model
        assert any(m in e.source for m in ("LLaMa2-7B", "LLaMa-2 7B", "LLaMa2-13B", "LLaMa-2 13B", "LLaMa2-chat-7B")), e
        assert any(_matches(s, e.row) for s in specs), f"{name}: no paper-preset run for {e.row}"
    table = build_table(exp, "paper", ResultsStore(tmp_path))
    shown = sum(c.paper is not None for row in table.cells for c in row)
    assert shown == ENTERED[name]
    assert not any("not in this preset's grid" in n for n in table.notes)


def _one(experiments, name, **want):
    got = {s.ref for s in expand(experiments[name], "paper") if _matches(s, want)}
    assert got, (name, want)
    return got


def test_shared_cells_are_the_same_runs(experiments):
    """Table 7's first row is Table 1's WeLore runs (10-50%) and Table 4's Compressed Params runs (30-70%);
    Figure 6 is Table 1's LLaMa2-7B WeLore 50% run."""
    for block, model in (("LLaMa2-7B", L7), ("LLaMa2-13B", L13)):
        row = {s.params["err"]: s.ref for s in expand(experiments["welore-table7"], "paper")
               if s.params["model"] == model and "welore_min_ratio" not in s.params}
        for e in ERR_1_5:
            assert _one(experiments, "welore-table1", _block=block, _variant="WeLore", err=e) == {row[e]}
        for e in (0.3, 0.5, 0.6, 0.7):
            assert _one(experiments, "welore-table4", _block=block, _variant="Compressed Params", err=e) == {row[e]}
    assert _one(experiments, "welore-fig6") == _one(experiments, "welore-table1", _block="LLaMa2-7B",
                                                     _variant="WeLore", err=0.5)


def test_welore_paper_runs_factor_only_the_lrcs(experiments):
    """l. 102 and 141: "If W belongs to LRCs, it will be replaced with a composition of two linear layers"."""
    n = 0
    for name in PAPER:
        for s in expand(experiments[name], "paper"):
            cfg = get_kind(s.kind).resolved_config(s.params)
            d = cfg.get("decomposition") or (cfg.get("finetune") or {}).get("decomposition")
            if d and d["allocator"] == "welore":
                assert d["welore_factor"] == "lrc", (name, s.labels)
                n += 1
    assert n > 50


def test_table5_trains_at_table9s_svamp_settings(experiments):
    """Table 9 (l. 369-376), SVAMP column: 700 train / 300 test, batch 8, max length 512, 500 training steps,
    lr 1e-4."""
    for s in expand(experiments["welore-table5"], "paper"):
        cfg = get_kind("finetune").resolved_config(s.params)
        prof = cfg["training_profile"]
        assert (prof["batch_size"], prof["max_steps"], prof["lr"], prof["cutoff_len"]) == (8, 500, 1e-4, 512), s.labels
        assert cfg["task"] == "arith" and tuple(cfg["eval_sets"]) == ("SVAMP",)
        # trained on 700 SVAMP problems and tested on the other 300, with the bare answer as the response
        assert cfg["task_options"] == {"train_set": "SVAMP", "answer_only": True}


def test_table7_prints_our_tau_beside_the_papers_k(experiments, tmp_path):
    """The τ column reads the compress runs' `welore_tau`; the paper's 0.175 (7B, 50%) sits beside it."""
    exp = experiments["welore-table7"]
    store = ResultsStore(tmp_path)
    spec = next(s for s in expand(exp, "paper") if s.params["model"] == L7 and s.params["err"] == 0.5
                and "welore_min_ratio" not in s.params)
    lease = store.claim(spec.kind, spec.key)
    store.commit(spec.kind, spec.key, lease, params=spec.params, metrics={"welore_tau": 0.1612, "err": 0.5003},
                 origin={"fabricated_for_tests": True})
    cells = {(c.row, c.pivot, c.column.ref_key): c for row in build_table(exp, "paper", store).cells for c in row}
    cell = cells[(("LLaMa2-7B", spec.labels["_variant"]), 0.5, "welore_tau")]
    assert cell.ours == pytest.approx(0.1612) and cell.paper == 0.175
    assert cells[(("LLaMa2-7B", spec.labels["_variant"]), 0.5, "err_reached")].ours == pytest.approx(0.5003)
