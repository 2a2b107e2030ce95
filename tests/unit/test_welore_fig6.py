"""WeLore Figure 6 (welore.txt l. 153-158): the layer-wise rank reduction ratio per projection, LRCs green and
N-LRCs red, drawn only from the compress run's allocation.csv."""

from pathlib import Path

import pytest

from deftlab.experiments.figures import load_results, plot_layers, render_figure
from deftlab.experiments.registry import load_experiment
from deftlab.experiments.runner import expand, run_experiment
from deftlab.store import ResultsStore

REPO = Path(__file__).resolve().parents[2]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GREEN, RED = (0.17254901960784313, 0.6274509803921569, 0.17254901960784313), (0.8392156862745098, 0.15294117647058825,
                                                                               0.1568627450980392)


def _csv(with_reduction: bool = True) -> str:
    """Three layers × seven projections; q/k heavily reduced (LRC), v/down barely (N-LRC), the rest mixed."""
    head = "name,layer,m,n,full_rank,rank,factored,lrc,params" + (",rank_reduction" if with_reduction else "")
    lines = [head]
    for layer in range(3):
        for i, p in enumerate(PROJ):
            red = {"q_proj": 0.95, "k_proj": 0.9, "v_proj": 0.1, "down_proj": 0.2}.get(p, 0.3 + 0.2 * layer)
            rank = round(100 * (1 - red))
            part = "self_attn" if i < 4 else "mlp"
            line = f"model.layers.{layer}.{part}.{p},{layer},100,100,100,{rank},True,{red > 0.4999},1"
            lines.append(line + (f",{1 - rank / 100}" if with_reduction else ""))
    return "\n".join(lines) + "\n"


def _fabricate(store, spec, csv: str) -> None:
    lease = store.claim(spec.kind, spec.key)
    (lease.run_dir / "allocation.csv").write_text(csv)
    store.commit(spec.kind, spec.key, lease, params=spec.params, metrics={"err": 0.5, "welore_tau": 0.2},
                 origin={"fabricated_for_tests": True})


@pytest.mark.parametrize("with_reduction", [True, False], ids=["csv", "csv-without-rank_reduction"])
def test_one_panel_per_projection_lrc_green_n_lrc_red(tmp_path, with_reduction):
    import matplotlib

    matplotlib.use("Agg")
    exp = load_experiment("welore-fig6", REPO / "experiments")
    assert exp.figure.type == "layers" and exp.figure.y == ["rank_reduction"]
    store = ResultsStore(tmp_path)
    (spec,) = expand(exp, "smoke")
    _fabricate(store, spec, _csv(with_reduction))
    fig = plot_layers(exp, load_results(exp, "smoke", store))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(PROJ)  # q, k, v, o, gate, up, down
    by = {ax.get_title(): ax for ax in axes}
    for name, want in (("q_proj", [GREEN] * 3), ("v_proj", [RED] * 3), ("up_proj", [RED, GREEN, GREEN])):
        bars = by[name].patches
        assert [b.get_height() for b in bars] == pytest.approx(
            [0.95] * 3 if name == "q_proj" else [0.1] * 3 if name == "v_proj" else [0.3, 0.5, 0.7], abs=0.011)
        assert [tuple(b.get_facecolor()[:3]) for b in bars] == [pytest.approx(c) for c in want]
    # WeLore's LRC cut (rank < 0.5 x full rank) is drawn on every panel
    assert all(any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.get_lines()) for ax in axes)
    matplotlib.pyplot.close(fig)


def test_smoke_preset_builds_the_figure_end_to_end(tmp_path, monkeypatch):
    """The smoke preset's WeLore 50% compress run on the tiny model, then the figure from its allocation.csv."""
    import pandas as pd

    monkeypatch.setenv("DEFTLAB_CACHE", str(tmp_path / "cache"))
    exp = load_experiment("welore-fig6", REPO / "experiments")
    store = ResultsStore(tmp_path / "results")
    report = run_experiment(exp, "smoke", store)
    assert len(report.ran) == 1 and not report.failed
    (spec,) = expand(exp, "smoke")
    alloc = pd.read_csv(store.run_dir(spec.kind, spec.key) / "allocation.csv")
    assert {"layer", "rank_reduction", "lrc"} <= set(alloc.columns) and len(alloc) == 2 * len(PROJ)
    assert alloc["rank_reduction"].between(0, 1).all()
    out = render_figure("welore-fig6", "smoke", results=store.root, out=tmp_path / "welore-fig6.png",
                        experiments=REPO / "experiments")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
