"""Figures rebuilt from the results store only (no recomputation): matplotlib with the Agg backend.

`render_figure(name, preset)` reads the experiment's planned runs from the store and writes
paper_figures/<name>-<preset>.png. Two figure types:
- "line": metric(s) vs a param (e.g. accuracy vs parameters preserved), one line per series, mean ± std over
  repeated runs (seeds), the paper's numbers (where recorded in `reference`) as hollow markers;
- "layers": per-layer curves from a per-matrix CSV that a run left in its directory (DeFT Figure 6); with
  `y: [rank_reduction]` alone (WeLore Figure 6: 1 − rank/full rank) one panel per matrix type instead, each
  matrix green (LRC) or red (N-LRC) when the CSV has an `lrc` column, WeLore's LRC cut as a dotted line.
Runs that are not recorded are left out and counted in the title, never filled in.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from pathlib import Path
from typing import Any

from deftlab.errors import DeftlabError
from deftlab.experiments.registry import Experiment, load_experiment, paper_figures_dir
from deftlab.experiments.runner import records_for
from deftlab.experiments.tables import _display, metric_value
from deftlab.scoring.intervals import accuracy_interval
from deftlab.store import ResultsStore


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def load_results(exp: Experiment, preset: str | None = None, store: ResultsStore | None = None):
    """One row per planned run: state, labels, scalar params (as given), scalar metrics, run_dir."""
    import pandas as pd

    store = store or ResultsStore()
    preset = preset or exp.default_preset
    rows = []
    for spec, rec in records_for(exp, preset, store):
        row: dict[str, Any] = {"key": spec.key, "kind": spec.kind, "state": "done" if rec else "missing",
                               "run_dir": str(store.run_dir(spec.kind, spec.key))}
        row.update({k: v for k, v in spec.params.items() if _scalar(v)})
        row.update(spec.labels)
        if rec:
            for k, v in rec["metrics"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in row:
                    row[k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def _transform(exp: Experiment, metric: str):
    cols = [c for c in (exp.table.columns if exp.table else []) if c.metric == metric]
    if cols:
        c = cols[0]
        return lambda v: _display(c, v), c.display
    return (lambda v: v), metric.split("|")[0]


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _value(row: dict, name: str) -> float | None:
    """A numeric param/label/metric of a results row (None when absent or not a number)."""
    clean = {k: v for k, v in row.items() if _present(v)}
    v = clean.get(name)
    if v is None:
        return metric_value(clean, name)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_line(exp: Experiment, df, fig=None):
    import matplotlib.pyplot as plt

    spec = exp.figure
    assert spec is not None and spec.x
    n = len(spec.y)
    if fig is None:
        fig = plt.figure(figsize=(max(4.6 * n, 6.0), 3.8))
    axes = fig.subplots(1, n, squeeze=False)[0]
    done = df[df["state"] == "done"] if len(df) else df
    for ax, metric in zip(axes, spec.y):
        tf, label = _transform(exp, metric)
        series: dict[tuple, dict[float, list[float]]] = {}
        cis: dict[tuple, dict[float, tuple[float, float]]] = {}  # one run's 95% accuracy interval, display units
        for _, row in done.iterrows():
            r = row.to_dict()
            x, y = _value(r, spec.x), _value(r, metric)
            if x is None or y is None:
                continue
            skey = tuple(r.get(s) for s in spec.series)
            series.setdefault(skey, {}).setdefault(float(x), []).append(tf(float(y)))
            iv = accuracy_interval({k: v for k, v in r.items() if _present(v)}, metric.split("|")[0].lower())
            if iv is not None:
                cis.setdefault(skey, {})[float(x)] = (tf(iv[0]), tf(iv[1]))
        for skey, pts in series.items():
            xs = sorted(pts)
            means = [sum(pts[x]) / len(pts[x]) for x in xs]
            name = ", ".join(str(v) for v in skey if v is not None) or "ours"
            one = cis.get(skey, {})
            errs = [_std(pts[x]) for x in xs]
            if all(len(pts[x]) == 1 and x in one for x in xs):  # one run per point: its 95% interval
                lo = [m - one[x][0] for m, x in zip(means, xs)]
                hi = [one[x][1] - m for m, x in zip(means, xs)]
                ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=f"{name} (95% interval)")
            elif any(e > 0 for e in errs):
                ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=f"{name} (± std)")
            else:
                ax.plot(xs, means, marker="o", label=name)
        if exp.reference:
            px, py = [], []
            for e in exp.reference.entries:
                if spec.x in e.row and metric in e.values:
                    px.append(float(e.row[spec.x]))
                    py.append(float(e.values[metric]))
            if px:
                ax.scatter(px, py, facecolors="none", edgecolors="black", label="paper", zorder=3)
        ax.set_xlabel(spec.xlabel or spec.x)
        ax.set_ylabel(spec.ylabel if (spec.ylabel and n == 1) else label)
        if spec.logx:
            ax.set_xscale("log")
            xs_all = sorted({x for pts in series.values() for x in pts})
            if xs_all:  # label the measured points themselves, not powers of ten
                ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
                ax.minorticks_off()
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def _std(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


LRC_COLUMN = "lrc"  # allocation.csv: True iff more than half the matrix's rank was removed (WeLore's LRC)
LRC_MARKED = ("rank_reduction",)  # panels on which LRC / N-LRC matrices are marked (WeLore Figure 6)


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v) if _present(v) else False


MATRIX_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _plot_by_matrix(spec, data, col: str, group: str, fig=None):
    """WeLore Figure 6's layout: one panel per matrix type (q, k, v, o, gate, up, down), `col` per layer; with
    an `lrc` column each matrix is green (LRC) or red (N-LRC), and WeLore's LRC cut (rank < 0.5 × full rank) is
    the dotted line. One run: bars; several runs: one line per run, points coloured the same way."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    names = sorted(data[group].astype(str).unique(),
                   key=lambda m: (MATRIX_ORDER.index(m) if m in MATRIX_ORDER else len(MATRIX_ORDER), m))
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    if fig is None:
        fig = plt.figure(figsize=(3.4 * cols, 2.6 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    has_lrc = LRC_COLUMN in data.columns
    lrc = data[LRC_COLUMN].map(_truthy) if has_lrc else None
    runs = list(dict.fromkeys(data["_run"]))
    for ax, name in zip(axes, names):
        sel = data[group].astype(str) == name
        for run in runs:
            g = data[sel & (data["_run"] == run)].sort_values(spec.layer_column)
            x, y = g[spec.layer_column], g[col]
            colours = (["tab:green" if v else "tab:red" for v in lrc[g.index]] if has_lrc
                       else ["tab:blue"] * len(g))
            if len(runs) == 1:
                ax.bar(x, y, color=colours, width=0.85)
            else:
                ax.plot(x, y, linewidth=1, label=str(run))
                ax.scatter(x, y, c=colours, s=10, zorder=3)
        if has_lrc:
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(spec.ylabel or col)
    for ax in axes[:len(names)][-cols:]:
        ax.set_xlabel(spec.xlabel or spec.layer_column)
    handles = [Patch(color="tab:green", label="LRC"), Patch(color="tab:red", label="N-LRC")] if has_lrc else []
    if len(runs) > 1:
        handles += axes[0].get_legend_handles_labels()[0]
    if handles:
        axes[0].legend(handles=handles, fontsize=7, loc="lower left")
    return fig


def plot_layers(exp: Experiment, df, fig=None):
    import matplotlib.pyplot as plt
    import pandas as pd

    spec = exp.figure
    assert spec is not None and spec.artifact
    done = df[df["state"] == "done"] if len(df) else df
    frames = []
    for _, row in done.iterrows():
        path = Path(row["run_dir"]) / spec.artifact
        if not path.is_file():
            raise DeftlabError(f"{exp.name}: run {row['kind']}/{row['key']} has no {spec.artifact}",
                               "re-run it with a deftlab version whose compress run writes that CSV")
        t = pd.read_csv(path)
        t["_run"] = ", ".join(str(row.get(s)) for s in spec.series) or row["key"]
        frames.append(t)
    if not frames:
        raise DeftlabError(f"{exp.name}: no recorded runs to plot", f"run: deftlab run {exp.name}")
    data = pd.concat(frames, ignore_index=True)
    if spec.layer_column not in data.columns:
        raise DeftlabError(f"{exp.name}: {spec.artifact} has no '{spec.layer_column}' column",
                           f"its columns are {list(data.columns)}")
    if "rank_reduction" in spec.y and "rank_reduction" not in data.columns and {"rank", "full_rank"} <= set(data):
        data["rank_reduction"] = 1.0 - data["rank"] / data["full_rank"]  # CSVs written before the column existed
    panels = [c for c in spec.y if c in data.columns]
    if not panels:
        raise DeftlabError(f"{exp.name}: {spec.artifact} has none of the columns {spec.y}",
                           f"its columns are {list(data.columns)}")
    group = spec.group_column
    if group and group not in data.columns and "name" in data.columns:  # "model.layers.3.mlp.up_proj" -> "up_proj"
        data[group] = data["name"].astype(str).str.rsplit(".", n=1).str[-1]
    group = group if group and group in data.columns else None
    if group and len(panels) == 1 and panels[0] in LRC_MARKED:
        return _plot_by_matrix(spec, data, panels[0], group, fig)
    if fig is None:
        fig = plt.figure(figsize=(max(4.2 * len(panels), 6.0), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    from matplotlib.ticker import MaxNLocator

    for i, (ax, col) in enumerate(zip(axes, panels)):
        keys = ["_run"] + ([group] if group else [])
        for gkey, g in data.groupby(keys, sort=True):
            per_layer = g.groupby(spec.layer_column)[col].mean().sort_index()
            gkey = gkey if isinstance(gkey, tuple) else (gkey,)
            name = " ".join(str(k) for k in (gkey[1:] if data["_run"].nunique() == 1 else gkey))
            ax.plot(per_layer.index, per_layer.values, marker=".", label=name or col)
        ax.set_xlabel(spec.xlabel or spec.layer_column)
        ax.set_ylabel(col)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i == 0 and ax.get_legend_handles_labels()[0]:  # the same lines in every panel: one legend
            ax.legend(fontsize=7)
    return fig


def render_figure(name: str, preset: str | None = None, results: str | os.PathLike | None = None,
                  out: str | os.PathLike | None = None, experiments: str | os.PathLike | None = None) -> Path:
    """Build figure `name` for `preset` from the store and write it as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp = load_experiment(name, experiments)
    if exp.figure is None:
        raise DeftlabError(f"experiment '{name}' declares no figure", "add a `figure:` section to its YAML")
    preset = preset or exp.default_preset
    exp.preset(preset)  # unknown preset -> clear error
    store = ResultsStore(results)
    df = load_results(exp, preset, store)
    n_missing = int((df["state"] != "done").sum()) if len(df) else 0
    if len(df) == 0 or n_missing == len(df):
        raise DeftlabError(f"{name} [{preset}]: no recorded runs in {store.root}",
                           f"run: deftlab run {name} --preset {preset}")
    fig = plot_layers(exp, df) if exp.figure.type == "layers" else plot_line(exp, df)
    title = exp.figure.title or exp.title
    sub = f"preset {preset}" + (f", {n_missing} of {len(df)} runs missing" if n_missing else "")
    fig.suptitle(textwrap.fill(title, 80) + f"\n({sub})", fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else paper_figures_dir() / f"{name}-{preset}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def figure_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of paper_figures/<name>.py."""
    p = argparse.ArgumentParser(description=f"Rebuild {name} from the results store (no recomputation).")
    p.add_argument("--preset", default=None, help="preset whose results to plot (default: the experiment's)")
    p.add_argument("--results", default=None, help="results store (default: $DEFTLAB_RESULTS or ./results)")
    p.add_argument("--out", default=None, help="output PNG (default: paper_figures/<name>-<preset>.png)")
    args = p.parse_args(argv)
    try:
        path = render_figure(name, args.preset, args.results, args.out)
    except DeftlabError as e:
        print(f"{name}: error: {e}", file=__import__("sys").stderr)
        return 2
    print(path)
    return 0
