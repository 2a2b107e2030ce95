"""Each reproduced paper table's `paper` preset runs the paper's experiment, and its table prints every number
the YAML enters from the paper.

The expected settings below are read from ../shared/papers/deft.txt (cited per table); they are what the
paper states, not what the YAMLs say. keep is the preserved fraction (None: a dense run), eta the search's
importance weight (DeFT App. C: η = 1 unless the table varies it).
"""

from collections import Counter

import pytest

from deftlab.experiments.registry import load_all
from deftlab.experiments.runner import expand
from deftlab.experiments.tables import build_table
from deftlab.store import ResultsStore

D = None  # dense run: no budget, no η
# table -> (run count, Counter of (model, adapter, keep, eta)) of the paper preset
PAPER = {
    # Table 1: rows attributed by #Params; DeFT rows keep ~85% (5.73/6.74, 55.49/65.29, 11.06/13.02, ...)
    "table1": (21, Counter({
        ("llama-7b", "full", D, D): 1, ("llama-7b", "qlora", D, D): 1, ("llama-7b", "qlora", 0.85, 1.0): 1,
        ("llama-65b", "none", D, D): 1, ("llama-65b", "qlora", D, D): 1, ("llama-65b", "qlora", 0.85, 1.0): 1,
        ("llama2-13b", "none", D, D): 1, ("llama2-13b", "full", D, D): 1, ("llama2-13b", "qlora", D, D): 1,
        ("llama2-13b", "qlora", 0.85, 1.0): 1, ("llama2-13b", "lora", D, D): 1, ("llama2-13b", "lora", 0.85, 1.0): 1,
        ("llama3-70b", "qlora", D, D): 1, ("llama3-70b", "qlora", 0.85, 1.0): 1,
        ("qwen2.5-7b", "full", D, D): 1, ("qwen2.5-7b", "qlora", D, D): 1, ("qwen2.5-7b", "qlora", 0.85, 1.0): 1,
        ("qwen2.5-7b", "lora", D, D): 1, ("qwen2.5-7b", "lora", 0.85, 1.0): 1,
        ("qwen3-32b", "qlora", D, D): 1, ("qwen3-32b", "qlora", 0.85, 1.0): 1})),
    # Table 2 (§3.1): LLaMA-13B QLoRA / + DeFT; Qwen-3 32B zero shot / QLoRA / + DeFT (28.00 of 32.76B ~ 85%)
    "table2": (5, Counter({("llama-13b", "qlora", D, D): 1, ("llama-13b", "qlora", 0.85, 1.0): 1,
                           ("qwen3-32b", "none", D, D): 1, ("qwen3-32b", "qlora", D, D): 1,
                           ("qwen3-32b", "qlora", 0.85, 1.0): 1})),
    # Table 3 (§3.2.1): LLaMA-7B, 85%, QLoRA + DeFT (62.90 = Table 1); η = 0 row = "w/o Importance"
    "table3": (4, Counter({("llama-7b", "qlora", 0.85, 1.0): 3, ("llama-7b", "qlora", 0.85, 0.0): 1})),
    # Table 4 (§3.2.3): LLaMA-65B, QLoRA vs DeFT at 55%, batch 1, 2, 4, 8, 16
    "table4": (10, Counter({("llama-65b", "qlora", D, D): 5, ("llama-65b", "qlora", 0.55, 1.0): 5})),
    # Table 5 (§3.2.4): LLaMA-7B, 85%, η ∈ {0, 0.1, 0.5, 1}
    "table5": (4, Counter({("llama-7b", "qlora", 0.85, e): 1 for e in (0.0, 0.1, 0.5, 1.0)})),
    # Table 6 (§3.2.5): LLaMA-2 13B, LoftQ and LoftQ + DeFT, "other settings as in Table 1" (~85%)
    "table6": (2, Counter({("llama2-13b", "loftq", D, D): 1, ("llama2-13b", "loftq", 0.85, 1.0): 1})),
    # Table 8 (App. D.1): LLaMA-2 13B and Qwen-2.5 7B, QLoRA vs QLoRA + DeFT
    "table8": (4, Counter({(m, "qlora", k, e): 1 for m in ("llama2-13b", "qwen2.5-7b") for k, e in ((D, D), (0.85, 1.0))})),
    # Table 9 (App. D.2): LLaMA-33B, 75%, batch 1, 2, 4
    "table9": (6, Counter({("llama-33b", "qlora", D, D): 3, ("llama-33b", "qlora", 0.75, 1.0): 3})),
    # Table 10 (App. D.3): LLaMA-7B, 85%, 32/64/128/256 calibration samples
    "table10": (4, Counter({("llama-7b", "qlora", 0.85, 1.0): 4})),
    # Table 11 (App. D.3): Qwen-2.5 7B (seed 42 = Table 1's 86.42, a QLoRA + DeFT row), three seeds
    "table11": (3, Counter({("qwen2.5-7b", "qlora", 0.85, 1.0): 3})),
    # Figure 6 (§3.2.2): LLaMA-65B keeping 60%
    "fig6": (1, Counter({("llama-65b", None, 0.6, 1.0): 1})),
}


@pytest.fixture(scope="module")
def experiments():
    return load_all()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_preset_runs_the_papers_experiment(experiments, name):
    n, expected = PAPER[name]
    specs = expand(experiments[name], "paper")
    got = Counter((s.params.get("model"), s.params.get("adapter"), s.params.get("keep"), s.params.get("eta"))
                  for s in specs)
    assert len(specs) == n and got == expected


def test_table2_trains_on_the_first_10000_xsum_articles(experiments):
    """DeFT §3.1: "We use the first 10000 pieces as the training set"."""
    assert {s.params.get("train_limit") for s in expand(experiments["table2"], "paper")} == {10000}


def test_arithmetic_paper_runs_use_llm_adapters_prompts_and_4_beam_decoding(experiments):
    """DeFT §3.1 adopts LLM-Adapters' evaluation (evaluate.py: its prompt, num_beams=4, 256 new tokens)."""
    from deftlab.train.profiles import load_profile

    for name in ("table1", "table3", "table5", "table6", "table10", "table11"):
        for s in expand(experiments[name], "paper"):
            assert s.params["task_options"] == {"prompt_style": "llm-adapters"}, name
            assert s.params["profile"] == "paper"
    assert load_profile("paper").num_beams == 4


def test_the_62_90_run_is_one_run_shared_by_tables_1_3_5_and_10(experiments):
    """The paper prints the same QLoRA + DeFT 85% LLaMA-7B score (62.90) in Tables 1, 3, 5 and 10."""
    keys = {}
    for name, label in (("table1", "LLaMA-7B QLoRA + DeFT"), ("table3", "DeFT"), ("table5", None), ("table10", None)):
        for s in expand(experiments[name], "paper"):
            p = s.params
            if (label in (s.labels.get("_setting"), s.labels.get("_variant")) if label
                    else p.get("eta") == 1.0 and p.get("calib_n") == 256):
                keys.setdefault(name, set()).add(s.ref)
    assert set(keys) == {"table1", "table3", "table5", "table10"}
    assert len(set.union(*keys.values())) == 1, keys


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_budgets_are_fractions_of_the_whole_model(experiments, name):
    """§3.1: "#Params" 5.73B of LLaMA-7B's 6.74B at ~85% (and 55.49/65.29, 11.06/13.02, ...): the paper's budget
    counts every parameter, so each decomposed paper run's keep is of the model (`keep_of: model`)."""
    from deftlab.experiments.kinds import get_kind

    decomposed = [s for s in expand(experiments[name], "paper") if s.params.get("keep") is not None]
    assert decomposed
    for s in decomposed:
        cfg = get_kind(s.kind).resolved_config(s.params)
        d = cfg.get("decomposition") or cfg["finetune"]["decomposition"]
        assert d["keep_of"] == "model", (name, s.labels)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_reference_cell_names_its_source_and_is_printed_by_the_paper_table(experiments, name, tmp_path):
    exp = experiments[name]
    ref = exp.reference
    if name == "fig6":
        assert not ref.entries  # a figure: nothing printed as numbers
        return
    assert ref.entries, f"{name}: no paper numbers entered"
    for e in ref.entries:
        assert e.source and e.source.startswith(("DeFT Table", "WeLore Table")), e
    table = build_table(exp, "paper", ResultsStore(tmp_path))
    shown = {(c.row, c.pivot, c.column.metric): c.paper for row in table.cells for c in row}
    entered = sum(len(e.values) for e in ref.entries)
    assert sum(v is not None for v in shown.values()) == entered
    assert not any("not in this preset's grid" in n for n in table.notes)


def test_welore_table1_paper_preset_is_7b_and_13b_on_c4(experiments, tmp_path):
    """WeLore §5.2.1 / Table 1: LLaMa-2 7B and 13B, C4 validation perplexity, ERR 10-50% × {uniform, OWL, WeLore},
    plus LRC fine-tuning at Table 8's settings (bs 1, seq 1024, lr 5e-5, cosine, 10k steps, warmup 500)."""
    from deftlab.train.profiles import load_profile

    specs = expand(experiments["welore-table1"], "paper")
    got = Counter((s.kind, s.params["model"], s.params.get("allocator") if s.kind == "compress" else s.params["adapter"],
                   s.params["err"]) for s in specs)
    errs = (0.1, 0.2, 0.3, 0.4, 0.5)
    want = Counter({("compress", m, a, e): 1 for m in ("llama2-7b", "llama2-13b") for a in ("uniform", "owl", "welore")
                    for e in errs})
    want.update({("finetune", m, "lrc", e): 1 for m in ("llama2-7b", "llama2-13b") for e in errs})
    assert got == want
    assert {tuple(s.params["ppl"]) for s in specs} == {("c4",)}
    prof = load_profile("welore-continual")
    assert (prof.batch_size, prof.cutoff_len, prof.lr, prof.schedule, prof.max_steps, prof.warmup_steps) == \
        (1, 1024, 5e-5, "cosine", 10000, 500)
    assert {s.params["profile"] for s in specs if s.kind == "finetune"} == {"welore-continual"}
    table = build_table(experiments["welore-table1"], "paper", ResultsStore(tmp_path))
    assert sum(c.paper is not None for row in table.cells for c in row) == len(experiments["welore-table1"].reference.entries) == 35
