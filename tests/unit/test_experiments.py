"""Experiment registry, resumable runner, results store, tables, figure scripts and offline sweeps.

Runs use a toy kind registered at runtime (counting its calls); nothing here loads a model.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import textwrap
from pathlib import Path

import pytest

from deftlab.cli import main as cli_main
from deftlab.config import ConfigError
from deftlab.errors import DeftlabError, UnknownNameError
from deftlab import store as store_mod
from deftlab.experiments import kinds, registry, runner, sweep, tables
from deftlab.experiments.registry import load_all, load_experiment
from deftlab.experiments.runner import RunFailedError, execute, expand, make_spec, plan, run_experiment
from deftlab.scoring.intervals import difference_interval, wilson
from deftlab.store import ResultsStore, run_key

REPO = Path(__file__).resolve().parents[2]
ISSUE5 = [f"table{i}" for i in range(1, 15)] + ["fig5a", "fig5b", "fig6", "fig7", "osd"] + \
         [f"welore-table{i}" for i in range(1, 7)]

TOY_YAML = """
name: toyexp
title: Toy experiment
source: {paper: Toy paper, item: Table 9}
kind: counting
base: {keep: 0.8, lora_r: 8, seed: 0}
grid:
  setting:
    - {_setting: Dense, method: dense, keep: null}
    - {_setting: Ours, method: ours}
  seed: [0, 1]
presets:
  smoke: {description: tiny, cost_s: 2}
  cpu-small:
    grid: {seed: [0]}
    cost_s: 30
default_preset: smoke
table:
  rows: [_setting]
  columns:
    - {metric: score, label: Score, fmt: "{:.2f}", std: true}
    - {metric: params_total, label: Params, fmt: "{:.0f}"}
reference:
  paper: Toy paper
  source: Table 9
  model: big-model
  entries:
    - {row: {_setting: Ours}, values: {score: 40.0}}
figure: {type: line, x: keep, y: [score], series: [method]}
"""


class Counter:
    def __init__(self):
        self.calls: list[dict] = []
        self.fail_when: dict | None = None

    def __call__(self, params: dict, run_dir: Path) -> dict:
        self.calls.append(params)
        if self.fail_when and all(params.get(k) == v for k, v in self.fail_when.items()):
            (run_dir / "partial.txt").write_text("half done")
            raise RuntimeError("simulated crash")
        (run_dir / "artifact.csv").write_text("layer,alpha\n0,1\n")
        return kinds.toy_run(params, run_dir)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    counter = Counter()
    kinds.register_kind("counting", counter, cost_s={"smoke": 2, "cpu-small": 30}, replace=True)
    exp_dir = tmp_path / "experiments"
    exp_dir.mkdir()
    (exp_dir / "toyexp.yaml").write_text(TOY_YAML)
    monkeypatch.setenv("DEFTLAB_EXPERIMENTS", str(exp_dir))
    monkeypatch.setenv("DEFTLAB_PAPER_FIGURES", str(tmp_path / "paper_figures"))
    yield counter, ResultsStore(tmp_path / "results"), load_experiment("toyexp", exp_dir)
    kinds.unregister_kind("counting")


# --- registry -----------------------------------------------------------------------------------------------------
def test_every_registered_experiment_loads_expands_and_has_all_presets():
    exps = load_all(REPO / "experiments")
    assert set(ISSUE5) <= set(exps), sorted(set(ISSUE5) - set(exps))
    smoke_runs = set()
    for name, exp in exps.items():
        assert set(registry.PRESETS) <= set(exp.presets), name
        assert exp.default_preset == "cpu-small", name
        assert exp.table is not None, name
        for preset in registry.PRESETS:
            items = plan(exp, preset, ResultsStore(REPO / "does-not-exist"))
            assert items, (name, preset)
        smoke_runs |= {it.spec.ref for it in plan(exp, "smoke", ResultsStore(REPO / "does-not-exist"))}
        # smoke runs the tiny model only, so `make all PRESET=smoke` stays fast
        for spec in expand(exp, "smoke"):
            assert spec.params.get("model", "tiny") == "tiny", (name, spec.params)
    assert len(smoke_runs) <= 100  # baselines added 9 tiny runs (~1 min)
    for fig in ("fig5a", "fig5b", "fig6", "fig7"):
        assert exps[fig].figure is not None
        assert (REPO / "paper_figures" / f"{fig}.py").is_file()


def test_reference_numbers_are_sourced_or_marked_unavailable():
    for name, exp in load_all(REPO / "experiments").items():
        ref = exp.reference
        assert ref is not None, name
        if ref.entries:
            assert ref.paper and (ref.source or all(e.source for e in ref.entries)), name
        else:  # no numbers: the note says so (papers not readable, or not entered yet)
            assert "not available here" in ref.note or "not entered yet" in ref.note, name


def test_make_file_has_a_target_per_experiment():
    mk = (REPO / "mk" / "experiments.mk").read_text()
    for name in registry.experiment_names(REPO / "experiments"):
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", mk), name
    assert re.search(r"^figures:", mk, re.M) and re.search(r"^all: experiments-all", mk, re.M)


def test_malformed_yaml_unknown_key_and_bad_reference_give_clear_errors(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: broken\ntitle: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML.*broken.yaml"):
        load_experiment("broken", tmp_path)
    (tmp_path / "extra.yaml").write_text(TOY_YAML.replace("name: toyexp", "name: extra") + "colour: red\n")
    kinds.register_kind("counting", kinds.toy_run, replace=True)
    try:
        with pytest.raises(ConfigError, match=r"extra.yaml.*unknown key\(s\) \['colour'\]"):
            load_experiment("extra", tmp_path)
        bad_ref = TOY_YAML.replace("name: toyexp", "name: badref").replace("{row: {_setting: Ours}",
                                                                         "{row: {setting: Ours}")
        (tmp_path / "badref.yaml").write_text(bad_ref)
        with pytest.raises(ConfigError, match="row keys"):
            load_experiment("badref", tmp_path)
    finally:
        kinds.unregister_kind("counting")
    (tmp_path / "nokind.yaml").write_text(TOY_YAML.replace("name: toyexp", "name: nokind"))
    with pytest.raises(UnknownNameError, match="unknown run kind 'counting'"):
        load_experiment("nokind", tmp_path)
    with pytest.raises(UnknownNameError, match="unknown experiment 'nope'.*nokind"):
        load_experiment("nope", tmp_path)


def test_grid_expansion_counts_presets_labels_nulls_templates_and_refs(toy):
    _, _, exp = toy
    smoke = expand(exp, "smoke")
    assert len(smoke) == 4  # 2 settings × 2 seeds
    assert [s.labels["_setting"] for s in smoke] == ["Dense", "Dense", "Ours", "Ours"]
    assert "keep" not in smoke[0].params and smoke[2].params["keep"] == 0.8  # null removes a param
    assert all("_setting" not in s.params for s in smoke)
    assert len(expand(exp, "cpu-small")) == 2  # the preset shrinks the seed axis
    with pytest.raises(UnknownNameError, match="unknown preset 'big'.*cpu-small, smoke"):
        expand(exp, "big")
    spec = make_spec("counting", {"model": "m", "dep": {"ref": {"kind": "counting", "params": {"model": "${model}"}}},
                                  "alias": "${model}"})
    assert spec.params["alias"] == "m"
    assert spec.refs["dep"].params == {"model": "m"}
    assert spec.params["dep"] == "@" + spec.refs["dep"].ref
    with pytest.raises(ConfigError, match="names param 'missing'"):
        make_spec("counting", {"x": "${missing}"})


def test_run_key_is_stable_and_ignores_order_labels_and_int_float():
    params = {"model": "tiny", "keep": 0.8, "eval_sets": ["a", "b"], "lr": 3e-4, "seed": 1}
    assert run_key("finetune", params) == "4446c92c6ee8"  # pinned: a change here orphans every stored result
    assert run_key("finetune", dict(reversed(list(params.items())))) == run_key("finetune", params)
    assert run_key("finetune", {**params, "seed": 1.0}) == run_key("finetune", params)
    assert run_key("finetune", {**params, "keep": 0.7}) != run_key("finetune", params)
    assert run_key("compress", params) != run_key("finetune", params)
    a = make_spec("finetune", {**params, "_row": "A"})
    b = make_spec("finetune", {**params, "_row": "B"})
    assert a.key == b.key == run_key("finetune", params)


# --- runner and store -----------------------------------------------------------------------------------------------
def test_runner_runs_only_missing_runs_and_records_manifest(toy):
    counter, store, exp = toy
    report = run_experiment(exp, "smoke", store)
    assert len(counter.calls) == 4 and len(report.ran) == 4
    rec = store.load("counting", report.ran[0].key)
    assert rec["params"] == report.ran[0].params and "score" in rec["metrics"]
    man = rec["manifest"]  # one record: the manifest is inside it, no second copy beside it
    assert {"git_commit", "packages", "hardware", "seed"} <= set(man) and man["seed"] == 0
    assert rec["origin"]["experiment"] == "toyexp" and rec["origin"]["preset"] == "smoke"
    assert "artifact.csv" in rec["artifacts"] and rec["format"] == store_mod.RECORD_FORMAT
    assert sorted(p.name for p in store.run_dir("counting", report.ran[0].key).iterdir()) == [
        "artifact.csv", "record.json", "started.txt", "toy.txt"]
    assert rec["run"]["attempts"] == 1 and rec["run"]["host"]
    report = run_experiment(exp, "smoke", store)
    assert len(counter.calls) == 4 and len(report.skipped) == 4 and not report.ran
    run_experiment(exp, "cpu-small", store)  # its runs are a subset of smoke's: nothing to do
    assert len(counter.calls) == 4


def test_resume_after_crash_keeps_earlier_results_and_reruns_only_the_rest(toy):
    counter, store, exp = toy
    counter.fail_when = {"method": "ours", "seed": 0}  # the third of four runs
    with pytest.raises(RunFailedError, match="simulated crash"):
        run_experiment(exp, "smoke", store)
    assert len(counter.calls) == 3
    states = [it.state for it in plan(exp, "smoke", store)]
    assert states == ["done", "done", "missing", "missing"]
    failed = store.aside_dirs("counting", expand(exp, "smoke")[2].key, "failed")
    assert len(failed) == 1 and "simulated crash" in (failed[0] / "traceback.txt").read_text()
    assert (failed[0] / "partial.txt").read_text() == "half done"
    counter.fail_when = None
    counter.calls.clear()
    run_experiment(exp, "smoke", store)
    assert [(c["method"], c["seed"]) for c in counter.calls] == [("ours", 0), ("ours", 1)]
    assert all(it.state == "done" for it in plan(exp, "smoke", store))


def test_keep_going_records_the_others(toy):
    counter, store, exp = toy
    counter.fail_when = {"method": "dense", "seed": 1}
    report = run_experiment(exp, "smoke", store, keep_going=True)
    assert len(report.failed) == 1 and len(report.ran) == 3


def test_deleting_one_result_reruns_only_that_run(toy):
    counter, store, exp = toy
    run_experiment(exp, "smoke", store)
    victim = expand(exp, "smoke")[1]
    shutil.rmtree(store.run_dir(victim.kind, victim.key))
    counter.calls.clear()
    run_experiment(exp, "smoke", store)
    assert counter.calls == [victim.params]


def test_corrupt_record_is_moved_aside_and_rerun(toy):
    counter, store, exp = toy
    run_experiment(exp, "smoke", store)
    victim = expand(exp, "smoke")[0]
    store.record_path(victim.kind, victim.key).write_text("{not json")
    assert store.status(victim.kind, victim.key).state == "corrupt"
    messages: list[str] = []
    counter.calls.clear()
    run_experiment(exp, "smoke", store, progress=messages.append)
    assert len(counter.calls) == 1
    assert any("unreadable" in m and "moved it aside" in m for m in messages)
    aside = store.aside_dirs(victim.kind, victim.key, "corrupt")
    assert len(aside) == 1 and (aside[0] / "record.json").read_text() == "{not json"
    assert store.status(victim.kind, victim.key).state == "done"


def test_force_reruns_and_keeps_the_old_result_aside(toy):
    counter, store, exp = toy
    run_experiment(exp, "cpu-small", store)
    counter.calls.clear()
    run_experiment(exp, "cpu-small", store, force=True)
    assert len(counter.calls) == 2
    spec = expand(exp, "cpu-small")[0]
    assert len(store.aside_dirs(spec.kind, spec.key, "superseded")) == 1


def test_a_killed_runs_directory_is_resumed_in_place_not_moved_aside(toy, monkeypatch):
    counter, store, exp = toy
    spec = expand(exp, "cpu-small")[0]
    partial = store.partial_dir(spec.kind, spec.key)
    partial.mkdir(parents=True)
    (partial / "checkpoint.txt").write_text("step 5")
    # a dead owner on this host (same boot): stale at once, whatever the timeout
    from deftlab.store import lease

    (partial / lease.LEASE_FILE).write_text(json.dumps({
        "pid": 2 ** 22 + 12345, "host": lease.host_name(), "boot_id": lease.boot_id(), "token": "t0",
        "heartbeat": __import__("time").time(), "attempt": 1}))
    assert store.status(spec.kind, spec.key).state == "interrupted"
    rec = execute(spec, store)
    assert store.status(spec.kind, spec.key).state == "done" and not store.aside_dirs(spec.kind, spec.key)
    assert "checkpoint.txt" in rec["artifacts"] and rec["run"]["attempts"] == 2
    assert not (store.run_dir(spec.kind, spec.key) / lease.LEASE_FILE).exists()


def test_a_fresh_lease_of_another_host_is_never_taken(toy, monkeypatch):
    counter, store, exp = toy
    spec = expand(exp, "cpu-small")[0]
    partial = store.partial_dir(spec.kind, spec.key)
    partial.mkdir(parents=True)
    from deftlab.store import RunInProgressError, lease

    (partial / lease.LEASE_FILE).write_text(json.dumps({
        "pid": 1, "host": "other-host", "boot_id": "b", "token": "t0", "heartbeat": __import__("time").time(),
        "attempt": 1}))
    with pytest.raises(RunInProgressError, match="in progress on host other-host"):
        execute(spec, store)
    report = run_experiment(exp, "cpu-small", store, wait=False)
    assert report.busy == [spec] and len(report.ran) == 1  # the other run of the preset ran
    assert partial.is_dir() and not store.aside_dirs(spec.kind, spec.key) and not counter.calls[1:]
    # once its heartbeat is older than the timeout, the lease is taken over
    monkeypatch.setenv(lease.TIMEOUT_ENV, "0.01")
    __import__("time").sleep(0.05)
    assert execute(spec, store)["run"]["attempts"] == 2


def test_dependency_is_recorded_first_and_passed_to_the_run(tmp_path):
    seen = {}

    def consumer(params, run_dir):
        seen.update(params)
        return {"ok": 1}

    kinds.register_kind("consumer", consumer, replace=True)
    kinds.register_kind("counting", kinds.toy_run, replace=True)
    try:
        store = ResultsStore(tmp_path)
        spec = make_spec("consumer", {"base": {"ref": {"kind": "counting", "params": {"keep": 0.5}}}, "codec": "x"})
        execute(spec, store)
        dep = spec.refs["base"]
        assert seen["base"]["ref"] == dep.ref and Path(seen["base"]["dir"]) == store.run_dir(dep.kind, dep.key)
        assert seen["base"]["metrics"]["score"] == store.load(dep.kind, dep.key)["metrics"]["score"]
        assert store.load(spec.kind, spec.key)["params"]["base"] == "@" + dep.ref
    finally:
        kinds.unregister_kind("consumer")
        kinds.unregister_kind("counting")


def test_cli_dry_run_lists_done_and_missing_with_cost(toy, capsys):
    counter, store, exp = toy
    assert cli_main(["run", "toyexp", "--dry-run", "--results", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert out.count("  missing ") == 4 and "4 to run" in out and "8 s" in out  # 4 runs × 2 s (smoke cost)
    execute(expand(exp, "smoke")[0], store)
    assert cli_main(["run", "toyexp", "--preset", "smoke", "--dry-run", "--results", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert out.count("  done ") == 1 and "3 to run" in out
    assert counter.calls and len(counter.calls) == 1  # dry runs run nothing


def test_cli_unknown_experiment_and_preset_are_one_line_errors(toy, capsys):
    assert cli_main(["run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and "toyexp" in err
    assert cli_main(["run", "toyexp", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_cli_run_prints_and_writes_the_table(toy, capsys, tmp_path):
    counter, store, exp = toy
    assert cli_main(["run", "toyexp", "--results", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "| Ours |" in out and "(paper 40.00" in out
    written = sorted(p.name for p in (tmp_path / "paper_figures" / "tables").iterdir())
    assert {"toyexp-smoke.md", "toyexp-smoke.tex", "toyexp-smoke.csv"} <= set(written)


# --- tables -----------------------------------------------------------------------------------------------------
def test_table_shows_missing_runs_paper_numbers_and_deltas(toy):
    counter, store, exp = toy
    run_experiment(exp, "smoke", store)
    gone = expand(exp, "smoke")[0]  # one of Dense's two seeds
    shutil.rmtree(store.run_dir(gone.kind, gone.key))
    res = tables.build_table(exp, "smoke", store)
    md = res.markdown()
    assert res.row_labels == ["Dense", "Ours"]
    dense_score, ours_score = res.cells[0][0], res.cells[1][0]
    assert dense_score.n_runs == 1 and "[1/2 runs]" in dense_score.text()
    assert ours_score.n_runs == 2 and "±" in ours_score.text()
    assert ours_score.paper == 40.0
    expected_delta = ours_score.ours - 40.0
    assert f"(paper 40.00, {'+' if expected_delta >= 0 else '−'}{abs(expected_delta):.2f})" in md
    assert "big-model" in md and "different (larger) model" not in md  # the toy runs have no `model` param
    assert "1 of 4 runs are not recorded" in md
    # remove every Dense run: its cells say "missing", never a number
    for spec in expand(exp, "smoke")[:2]:
        shutil.rmtree(store.run_dir(spec.kind, spec.key), ignore_errors=True)
    res = tables.build_table(exp, "smoke", store)
    assert [c.text() for c in res.cells[0]] == ["missing", "missing"]
    df = res.frame()
    assert {"ours", "paper", "delta", "n_runs", "cell"} <= set(df.columns)
    assert df.loc[df["row"] == "Ours", "paper"].dropna().tolist() == [40.0]
    tex = res.latex()
    assert "\\begin{tabular}" in tex and "$\\pm$" in tex and "Dense & missing & missing" in tex


def test_table_pivot_pct_scale_and_missing_metric(tmp_path):
    kinds.register_kind("counting", lambda p, d: {"acc": 0.5, "mem_mb": 2048.0}, replace=True)
    try:
        (tmp_path / "piv.yaml").write_text(textwrap.dedent("""
            name: piv
            title: Pivot
            source: {paper: P, item: Table 4}
            kind: counting
            grid: {method: [a, b], batch_size: [1, 2]}
            runs: [{method: c, batch_size: 1}]
            presets: {cpu-small: {}}
            table:
              rows: [method]
              pivot: batch_size
              pivot_format: "bs={}"
              columns:
                - {metric: acc, label: Acc, fmt: "{:.1f}", pct: true}
                - {metric: MEM_MB, label: Mem, fmt: "{:.1f}", scale: 0.0009765625}
                - {metric: absent, label: Absent}
                - {metric: gone, label: Gone, optional: true}
            reference:
              entries: [{row: {method: b, batch_size: 2}, values: {acc: 48.0}}]
            """))
        exp = load_experiment("piv", tmp_path)
        store = ResultsStore(tmp_path / "r")
        run_experiment(exp, None, store)
        res = tables.build_table(exp, None, store)
        assert res.column_labels == ["Acc @ bs=1", "Mem @ bs=1", "Absent @ bs=1", "Acc @ bs=2", "Mem @ bs=2",
                                     "Absent @ bs=2"]
        assert [c.text() for c in res.cells[1]] == ["50.0", "2.0", "—", "50.0 (paper 48.0, +2.0)", "2.0", "—"]
        assert [c.text() for c in res.cells[2]] == ["50.0", "2.0", "—", "n/a", "n/a", "n/a"]  # c ran at bs=1 only
    finally:
        kinds.unregister_kind("counting")


def _scored_table(tmp_path, accs: list[float], table_extra: str = "", reference: str = ""):
    """The table of a one-metric experiment whose runs report acc_gsm8k = acc and acc_svamp = 0.1 (50 problems
    each) and their mean as avg."""
    kinds.register_kind("scored", lambda p, d: {"acc_gsm8k": p["acc"], "n_gsm8k": 50, "acc_svamp": 0.1,
                                                  "n_svamp": 50, "avg": (p["acc"] + 0.1) / 2}, replace=True)
    try:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sc.yaml").write_text(textwrap.dedent("""
            name: sc
            title: Scored
            source: {paper: P, item: Table 1}
            kind: scored
            grid: {acc: %s}
            presets: {cpu-small: {}}
            table:
              rows: [acc]%s
              columns:
                - {metric: acc_gsm8k, label: GSM8K, fmt: "{:.1f}", pct: true}
                - {metric: avg, label: Avg, fmt: "{:.1f}", pct: true}
            """) % (accs, table_extra) + reference)
        exp = load_experiment("sc", tmp_path)
        store = ResultsStore(tmp_path / "r")
        run_experiment(exp, None, store)
        return tables.build_table(exp, None, store)
    finally:
        kinds.unregister_kind("scored")


def test_one_run_accuracies_carry_their_95_interval_and_mark_a_paper_number_outside_it(tmp_path):
    res = _scored_table(tmp_path, [0.5, 0.2], reference=textwrap.dedent("""
        reference:
          entries: [{row: {acc: 0.5}, values: {acc_gsm8k: 60.0}}, {row: {acc: 0.2}, values: {acc_gsm8k: 60.0}}]
        """))
    half, fifth = res.cells[0][0], res.cells[1][0]
    assert half.text() == "50.0 [36.6, 63.4] (paper 60.0, −10.0)"  # 60 lies inside: no mark
    assert fifth.text().endswith("(paper 60.0, −40.0†)") and fifth.paper_outside_ci
    assert res.cells[0][1].ci == pytest.approx(tuple(100 * a for a in wilson(30, 100)))  # Avg: pooled 30/100
    assert any("95% interval" in n for n in res.notes)
    assert {"ci_low", "ci_high"} <= set(res.frame().columns)


def test_accuracies_whose_difference_from_the_compared_row_excludes_zero_are_marked(tmp_path):
    res = _scored_table(tmp_path, [0.2, 0.5, 0.4], table_extra="\n  compare_to: {acc: 0.5}")
    low, base, near = res.cells
    assert low[0].differs and low[0].text().endswith("]*")  # 10/50 vs 25/50
    assert not near[0].differs and near[0].diff_ci[0] < 0 < near[0].diff_ci[1]  # 20/50 vs 25/50
    assert base[0].diff_ci is None and not base[0].text().endswith("*")  # the compared row itself
    assert low[1].diff_ci == pytest.approx(tuple(100 * x for x in difference_interval(
        {"acc_gsm8k": 0.2, "n_gsm8k": 50, "acc_svamp": 0.1, "n_svamp": 50},
        {"acc_gsm8k": 0.5, "n_gsm8k": 50, "acc_svamp": 0.1, "n_svamp": 50}, "avg")))
    assert any("from the row '0.5'" in n and "2 cell(s)" in n for n in res.notes)
    assert res.frame()["differs"].sum() == 2
    # without compare_to the first row is the baseline
    res = _scored_table(tmp_path / "first", [0.5, 0.2, 0.4])
    assert res.cells[1][0].differs and res.cells[0][0].diff_ci is None


def test_answer_losses_are_compared_item_by_item_with_the_compared_row(tmp_path):
    """A kind that writes prediction files: run `shift` adds shift nats to every token of 40 problems whose own
    losses vary widely, so only the pairing can resolve a shift of 0.05."""
    import json as _json
    import random

    rng = random.Random(1)
    items = [(rng.uniform(0.2, 3.0), rng.randint(5, 60)) for _ in range(40)]

    def lossy(p, d):
        (d / "eval").mkdir(parents=True, exist_ok=True)
        noise = random.Random(str(p["shift"]))
        rows = [{"index": i, "answer_nll": h + p["shift"] + noise.gauss(0, 0.01), "answer_tokens": t}
                for i, (h, t) in enumerate(items)]
        (d / "eval" / "SVAMP.predictions.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
        tot = sum(r["answer_nll"] * r["answer_tokens"] for r in rows) / sum(r["answer_tokens"] for r in rows)
        return {"answer_nll": tot, "answer_nll_svamp": tot}

    kinds.register_kind("lossy", lossy, replace=True)
    try:
        (tmp_path / "lo.yaml").write_text(textwrap.dedent("""
            name: lo
            title: Losses
            source: {paper: P, item: Table 1}
            kind: lossy
            grid: {shift: [0.0, 0.05, 0.0001]}
            presets: {cpu-small: {}}
            table:
              rows: [shift]
              columns:
                - {metric: answer_nll, label: NLL, fmt: "{:.3f}"}
            """))
        exp = load_experiment("lo", tmp_path)
        store = ResultsStore(tmp_path / "r")
        run_experiment(exp, None, store)
        res = tables.build_table(exp, None, store)
    finally:
        kinds.unregister_kind("lossy")
    base, shifted, same = (row[0] for row in res.cells)
    assert base.diff_ci is None
    assert shifted.differs and shifted.text().endswith("*") and shifted.diff_ci[0] < 0.05 < shifted.diff_ci[1]
    assert shifted.diff_ci[1] - shifted.diff_ci[0] < 0.02  # unpaired, the items' own spread would swamp 0.05
    assert not same.differs and same.diff_ci[0] < 0 < same.diff_ci[1]
    assert any("answer NLL" in n and "1 cell(s) marked" in n for n in res.notes)


# --- figures ------------------------------------------------------------------------------------------------------
def _fabricate(store: ResultsStore, spec, metrics: dict, files: dict[str, str] | None = None) -> None:
    """A fabricated *test* record for a planned run (no computation)."""
    lease = store.claim(spec.kind, spec.key)
    for name, text in (files or {}).items():
        (lease.run_dir / name).write_text(text)
    store.commit(spec.kind, spec.key, lease, params=spec.params, metrics=metrics,
                 origin={"fabricated_for_tests": True})


def test_figure_scripts_build_pngs_from_fabricated_results(tmp_path):
    store = ResultsStore(tmp_path / "results")
    for i, spec in enumerate(expand(load_experiment("fig5b", REPO / "experiments"), "smoke")):
        _fabricate(store, spec, {"avg": 0.3 + 0.05 * i, "params": 1e6})
    csv = "name,layer,rank,f_theta,alpha\n" + "".join(  # the columns of the compress run's allocation.csv
        f"model.layers.{layer}.self_attn.{m}_proj,{layer},{10 + layer},0.5,{0.1 * layer}\n"
        for layer in range(2) for m in "qk")
    for spec in expand(load_experiment("fig6", REPO / "experiments"), "smoke"):
        _fabricate(store, spec, {"keep_fraction": 0.8}, {"allocation.csv": csv})
    for name in ("fig5b", "fig6"):
        script = runpy.run_path(str(REPO / "paper_figures" / f"{name}.py"), run_name="not_main")
        out = tmp_path / f"{name}.png"
        assert script["main"](["--preset", "smoke", "--results", str(store.root), "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # no recorded runs -> a clear error, no empty figure
    script = runpy.run_path(str(REPO / "paper_figures" / "fig7.py"), run_name="not_main")
    assert script["main"](["--preset", "smoke", "--results", str(store.root), "--out",
                           str(tmp_path / "fig7.png")]) == 2
    assert not (tmp_path / "fig7.png").exists()


def test_line_figures_draw_one_runs_95_interval_around_an_accuracy(tmp_path):
    from deftlab.experiments.figures import load_results, plot_line

    exp = load_experiment("fig5b", REPO / "experiments")
    store = ResultsStore(tmp_path / "results")
    for i, spec in enumerate(expand(exp, "smoke")):
        _fabricate(store, spec, {"avg": 0.1 * (i + 1), "acc_gsm8k": 0.1 * (i + 1), "n_gsm8k": 50, "params": 1e6})
    fig = plot_line(exp, load_results(exp, "smoke", store))
    bars = [c for c in fig.axes[0].containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert bars  # every point has an interval
    segs = [seg for c in bars for seg in c.lines[2][0].get_segments()]
    lo, hi = wilson(5, 50)  # the first run: 5 of 50
    assert any(abs(seg[0][1] - 100 * lo) < 1e-9 and abs(seg[1][1] - 100 * hi) < 1e-9 for seg in segs)


# --- sweeps -------------------------------------------------------------------------------------------------------
def test_repo_sweep_configs_load_and_share_keys_with_the_experiment():
    names = sweep.sweep_names()
    assert {"eta", "lora-rank", "budget", "lr"} <= set(names)
    eta = sweep.load_sweep("eta", preset="smoke")
    assert [t["eta"] for t in eta.trials] == [0.0, 0.1, 0.5, 1.0] and "deftlab" not in eta.wandb_config
    table5 = {s.key for s in expand(load_experiment("table5", REPO / "experiments"), "smoke")}
    assert table5 <= {sweep.trial_spec(eta, t).key for t in eta.trials}


def test_offline_sweep_runs_the_grid_once_into_the_store(tmp_path, monkeypatch, capsys):
    counter = Counter()
    kinds.register_kind("counting", counter, replace=True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(textwrap.dedent("""
        method: grid
        metric: {name: score, goal: maximize}
        parameters:
          lora_r: {values: [4, 16]}
          keep: {values: [0.5, 0.9]}
          seed: {value: 3}
        deftlab: {kind: counting, base: {eta: 0.5}}
        """))
    try:
        assert not sweep.wandb_online()
        assert cli_main(["sweep", str(cfg), "--results", str(tmp_path / "r")]) == 0
        captured = capsys.readouterr()
        assert "running the grid locally" in captured.err and "best score" in captured.out
        assert len(counter.calls) == 4 and {c["seed"] for c in counter.calls} == {3}
        assert all(c["eta"] == 0.5 for c in counter.calls)
        assert len(list(ResultsStore(tmp_path / "r").records("counting"))) == 4
        assert cli_main(["sweep", str(cfg), "--results", str(tmp_path / "r")]) == 0
        assert len(counter.calls) == 4  # recorded trials are not recomputed
        bad = tmp_path / "bad.yaml"
        bad.write_text("parameters: {lr: {min: 0.1, max: 1.0}}\ndeftlab: {kind: counting}\n")
        with pytest.raises(ConfigError, match="distribution"):
            sweep.load_sweep(str(bad))
    finally:
        kinds.unregister_kind("counting")


def test_run_function_returning_a_non_dict_is_a_failed_run(tmp_path):
    kinds.register_kind("counting", lambda p, d: 3.0, replace=True)
    try:
        store = ResultsStore(tmp_path)
        spec = make_spec("counting", {"a": 1})
        with pytest.raises(RunFailedError, match="not a dict"):
            execute(spec, store)
        assert store.status(spec.kind, spec.key).state == "missing"
        assert store_mod.RECORD not in {p.name for p in store.aside_dirs(spec.kind, spec.key)[0].iterdir()}
    finally:
        kinds.unregister_kind("counting")


def test_unavailable_kind_module_is_a_clear_error(tmp_path):
    kinds.register_kind("ghost", "deftlab.no_such_module:run", replace=True)
    try:
        with pytest.raises(DeftlabError, match="needs deftlab.no_such_module"):
            execute(make_spec("ghost", {"a": 1}), ResultsStore(tmp_path))
    finally:
        kinds.unregister_kind("ghost")
    assert runner.format_duration(7200) == "2.0 h"


def test_wandb_agent_path_writes_the_same_store_records_as_the_local_grid(tmp_path, monkeypatch):
    """A fake `wandb` module stands in for the service: each agent trial must land on the local grid's key."""
    import sys
    import types

    counter = Counter()
    kinds.register_kind("counting", counter, replace=True)
    cfg = tmp_path / "s.yaml"
    cfg.write_text("method: grid\nparameters: {keep: {values: [0.5, 0.9]}}\ndeftlab: {kind: counting}\n")
    calls: dict = {}

    class FakeRun:
        def __init__(self, config):
            self.config, self.summary = config, {}

        def finish(self):
            calls.setdefault("finished", []).append(self.summary)

    pending: list[dict] = []
    fake = types.SimpleNamespace(
        sweep=lambda sweep, project: calls.update(config=sweep, project=project) or "sweep-1",
        init=lambda: FakeRun(pending.pop(0)),
        log=lambda metrics: calls.setdefault("logged", []).append(metrics))

    def agent(sweep_id, function, count, project):
        for values in ({"keep": 0.5}, {"keep": 0.9}):
            pending.append(values)
            function()

    fake.agent = agent
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    try:
        assert sweep.wandb_online()
        s = sweep.load_sweep(str(cfg))
        store = ResultsStore(tmp_path / "r")
        assert sweep.run_wandb(s, store) == "sweep-1"
        assert "deftlab" not in calls["config"] and len(counter.calls) == 2
        assert {f["deftlab_run"] for f in calls["finished"]} == {sweep.trial_spec(s, t).ref for t in s.trials}
        assert len(sweep.run_local(s, store)) == 2 and len(counter.calls) == 2  # already recorded by the agent
    finally:
        kinds.unregister_kind("counting")


def test_training_profile_file_content_is_part_of_the_key(tmp_path, monkeypatch):
    """Editing configs/profiles/<profile>.yaml makes its runs missing; comments and key order do not."""
    presets = tmp_path / "configs" / "profiles"
    presets.mkdir(parents=True)
    monkeypatch.setenv("DEFTLAB_CONFIGS", str(tmp_path / "configs"))
    (presets / "p.yaml").write_text("lr: 3.0e-4\neval_limit: 50\n")
    first = make_spec("finetune", {"model": "tiny", "profile": "p"})
    (presets / "p.yaml").write_text("# a comment\neval_limit: 50\nlr: 0.0003\n")
    assert make_spec("finetune", {"model": "tiny", "profile": "p"}).key == first.key
    (presets / "p.yaml").write_text("lr: 3.0e-4\neval_limit: 100\n")
    changed = make_spec("finetune", {"model": "tiny", "profile": "p"})
    assert changed.key != first.key and changed.params == first.params
    assert changed.fingerprint["profile"].startswith("p:")
    assert make_spec("compress", {"model": "tiny", "profile": "p"}).fingerprint == {}  # compress has no profile
