"""Execute every notebook in notebooks/ with nbclient against fabricated smoke results in a tmp store.

The records are fabricated *test* records (no model runs): the notebooks only read the store and plot, so this
checks that they execute, find the runs, and draw figures.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from deftlab.experiments import ResultsStore, expand, load_experiment  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIGURE_NOTEBOOKS = {"deft-budget-figures": 3, "deft-layer-profile": 1, "osd": 1}  # expected PNG outputs


def _fabricate(store: ResultsStore, spec, metrics: dict, files: dict[str, str] | None = None) -> None:
    if store.status(spec.kind, spec.key).state == "done":
        return
    for dep in spec.refs.values():
        _fabricate(store, dep, {"avg": 0.4})
    lease = store.claim(spec.kind, spec.key)
    for name, text in (files or {}).items():
        (lease.run_dir / name).write_text(text)
    store.commit(spec.kind, spec.key, lease, params=spec.params, metrics=metrics,
                 origin={"fabricated_for_tests": True})


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory):
    store = ResultsStore(tmp_path_factory.mktemp("results"))
    rng = random.Random(0)
    for name in ("fig5a", "fig5b", "fig7", "osd", "table1", "table3", "welore-table1"):
        for spec in expand(load_experiment(name), "smoke"):
            keep = spec.params.get("keep", 1.0)
            _fabricate(store, spec, {"avg": 0.3 + 0.3 * keep + rng.random() * 0.02, "acc_generated": 0.5,
                                     "params": 1e6 * keep, "trainable": 1e4, "ppl_generated": 10 / keep,
                                     "rel_error": 1.0 - spec.params.get("budget", 0.0), "ppl_tokens": 256})
    csv = "name,layer,rank,f_theta,alpha\n" + "".join(  # the columns of the compress run's allocation.csv
        f"model.layers.{layer}.self_attn.{m}_proj,{layer},{8 + layer},0.5,{0.1 * layer}\n"
        for layer in range(2) for m in "qk")
    for spec in expand(load_experiment("fig6"), "smoke"):
        _fabricate(store, spec, {"keep_fraction": 0.8}, {"allocation.csv": csv})
    return store


def test_there_is_a_notebook_per_figure_group():
    assert {p.stem for p in NOTEBOOKS} >= set(FIGURE_NOTEBOOKS) | {"paper-tables"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_on_smoke_results(path, smoke_store, monkeypatch, tmp_path):
    monkeypatch.setenv("DEFTLAB_RESULTS", str(smoke_store.root))
    monkeypatch.setenv("DEFTLAB_PRESET", "smoke")
    monkeypatch.setenv("DEFTLAB_PAPER_FIGURES", str(tmp_path / "figures"))  # never write into the checkout
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                   + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert f"results {smoke_store.root}" in text  # it read the tmp store, not ./results
    assert "nothing recorded yet" not in text
    pngs = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pngs == FIGURE_NOTEBOOKS.get(path.stem, 0)
    if path.stem == "paper-tables":
        assert "DeFT 80%" in text and "WeLore + LRC FT" in text  # rows of table1 and welore-table1
        assert "(paper " in text  # the paper's numbers beside ours (welore-table1's entries)
