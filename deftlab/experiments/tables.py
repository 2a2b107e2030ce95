"""Paper-vs-measured tables from the results store: Markdown, LaTeX and CSV in the paper's layout.

Every measured cell is shown beside the paper's number and the difference, e.g. "12.30 (paper 14.10, −1.80)".
A run that is not recorded is shown as "missing" (never filled in or interpolated); a recorded run without the
metric is shown as "—". Every row names the runs behind it (the `run` column: store keys, `deftlab show KEY`).
Header notes say which preset and model produced the numbers, which sets, subsets and tokens the runs used (from
the records' resolved configs), which git commits the records came from, and where the paper's numbers come from.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deftlab.experiments.registry import ColumnSpec, Experiment, paper_figures_dir
from deftlab.eval.predictions import item_losses
from deftlab.scoring.intervals import accuracy_interval, difference_interval, paired_ratio_difference
from deftlab.experiments.runner import RunSpec, records_for
from deftlab.manifest import write_json_atomic
from deftlab.store import ResultsStore

MISSING = "missing"
NO_METRIC = "—"
NOT_PLANNED = "n/a"
DIFFERS = "*"  # the difference from the compared row excludes 0 at 95%
# columns whose runs keep per-item losses, compared item by item: answer NLL, and a text task's held-out perplexity
# (its difference is in log-perplexity, nats per token)
PAIRED = ("answer_nll", "ppl_heldout")
LEGEND = (f"Cells: '{MISSING}' = a planned run that is not recorded; '{NO_METRIC}' = recorded, but the run did not "
          f"report this metric; '{NOT_PLANNED}' = no run of this preset's grid belongs here")
# resolved-config entries (dotted paths) that say what a run used; summarised in the header notes
CONFIG_NOTES = (("eval_sets", "evaluation sets"), ("eval_limit", "problems per set (eval_limit)"),
                ("train_limit", "training examples (train_limit)"), ("epochs", "epochs"),
                ("max_steps", "max_steps"), ("max_new_tokens", "max_new_tokens"),
                ("perplexity.ppl", "perplexity corpora"), ("perplexity.ppl_max_tokens", "perplexity tokens"),
                ("decomposition.calib", "calibration data"), ("decomposition.calib_n", "calibration examples"),
                ("training_profile.name", "training profile"))
# what a record without a resolved config (or a kind that records none) used, from its params
SUBSET_PARAMS = ("ppl_max_tokens", "eval_limit", "eval_sets", "train_limit", "calib_n", "max_steps")


def metric_value(metrics: dict, name: str) -> float | None:
    """metrics[name] for the first of "a|b|..." present (exact, then case-insensitive); None if absent."""
    lower = {str(k).lower(): k for k in metrics}
    for alt in name.split("|"):
        alt = alt.strip()
        key = alt if alt in metrics else lower.get(alt.lower())
        if key is None:
            continue
        v = metrics[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        return float(v)
    return None


def _display(col: ColumnSpec, v: float) -> float:
    if col.pct and abs(v) <= 1.0:
        v = v * 100.0
    return v * col.scale


def _fmt(col: ColumnSpec, v: float | None) -> str:
    if v is None:
        return NO_METRIC
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return col.fmt.format(v)


def _fmt_delta(col: ColumnSpec, d: float) -> str:
    s = _fmt(col, abs(d))
    return ("+" if d >= 0 else "−") + s


def _norm(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return tuple(_norm(x) for x in v)
    return v


@dataclass
class Cell:
    row: tuple
    pivot: Any
    column: ColumnSpec
    ours: float | None = None
    std: float | None = None
    n_runs: int = 0
    n_expected: int = 0
    paper: float | None = None
    paper_source: str | None = None
    runs: tuple[str, ...] = ()  # store keys of the recorded runs behind the cell
    ci: tuple[float, float] | None = None  # 95% interval of a one-run accuracy, in display units
    # 95% interval of this row's accuracy minus the compared row's (display units), and whether it excludes 0
    diff_ci: tuple[float, float] | None = None
    metrics: dict | None = field(default=None, repr=False)  # the one run's flat metrics (for the comparison)
    eval_dir: Path | None = field(default=None, repr=False)  # the one run's prediction files (paired losses)

    @property
    def differs(self) -> bool:
        return self.diff_ci is not None and not self.diff_ci[0] <= 0.0 <= self.diff_ci[1]

    @property
    def paper_outside_ci(self) -> bool:
        return self.ci is not None and self.paper is not None and not self.ci[0] <= self.paper <= self.ci[1]

    @property
    def delta(self) -> float | None:
        if self.ours is None or self.paper is None:
            return None
        return self.ours - self.paper

    def text(self) -> str:
        col = self.column
        if self.n_expected == 0:
            ours = NOT_PLANNED
        elif self.n_runs == 0:
            ours = MISSING
        else:
            ours = _fmt(col, self.ours)
            if self.std is not None and col.std:
                ours += " ± " + _fmt(col, self.std)
            if self.ci is not None:
                ours += f" [{_fmt(col, self.ci[0])}, {_fmt(col, self.ci[1])}]"
            if self.differs:
                ours += DIFFERS
            if self.n_runs < self.n_expected:
                ours += f" [{self.n_runs}/{self.n_expected} runs]"
        if self.paper is None:
            return ours
        paper = _fmt(col, self.paper)
        if self.delta is None:
            return f"{ours} (paper {paper})"
        mark = "†" if self.paper_outside_ci else ""
        return f"{ours} (paper {paper}, {_fmt_delta(col, self.delta)}{mark})"


@dataclass
class TableResult:
    experiment: str
    preset: str
    title: str
    row_header: str
    row_labels: list[str]
    column_labels: list[str]
    cells: list[list[Cell]]  # [row][column]
    notes: list[str] = field(default_factory=list)
    missing: int = 0
    expected: int = 0

    def row_runs(self, row: list[Cell]) -> str:
        """The keys of the runs behind a row, in plan order, e.g. "4446c92c6ee8 0c1d2e3f4a5b"."""
        keys = list(dict.fromkeys(k for c in row for k in c.runs))
        return " ".join(keys) if keys else MISSING

    def markdown(self) -> str:
        header = [self.row_header] + self.column_labels + ["run"]
        body = [[label] + [c.text() for c in row] + [self.row_runs(row)]
                for label, row in zip(self.row_labels, self.cells)]
        lines = [f"### {self.title} [{self.preset}]", ""]
        lines += [f"- {n}" for n in self.notes]
        lines.append("")
        lines.append(_md_row(header))
        lines.append("|" + "|".join(" --- " for _ in header) + "|")
        lines += [_md_row(r) for r in body]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        ncol = len(self.column_labels)
        lines = [f"% {self.title} [{self.preset}] -- generated by deftlab from the results store"]
        lines += [f"% {n}" for n in self.notes]
        lines += ["\\begin{table}[t]", "\\centering", "\\small",
                  f"\\caption{{{_tex(self.title)} (preset \\texttt{{{_tex(self.preset)}}})}}",
                  "\\begin{tabular}{l" + "c" * ncol + "l}", "\\toprule",
                  " & ".join(_tex(h) for h in [self.row_header] + self.column_labels + ["run"]) + " \\\\",
                  "\\midrule"]
        for label, row in zip(self.row_labels, self.cells):
            lines.append(" & ".join([_tex(label)] + [_tex(c.text()) for c in row]
                                    + ["\\texttt{" + _tex(self.row_runs(row)) + "}"]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def frame(self):
        """Long-form pandas DataFrame: one row per (table row, column) with ours / paper / delta."""
        import pandas as pd

        rows = []
        for label, row in zip(self.row_labels, self.cells):
            for c, col_label in zip(row, self.column_labels):
                rows.append({"row": label, "column": col_label, "metric": c.column.metric,
                             "pivot": c.pivot, "ours": c.ours, "std": c.std, "n_runs": c.n_runs,
                             "n_expected": c.n_expected, "paper": c.paper, "delta": c.delta,
                             "ci_low": c.ci[0] if c.ci else None, "ci_high": c.ci[1] if c.ci else None,
                             "diff_low": c.diff_ci[0] if c.diff_ci else None,
                             "diff_high": c.diff_ci[1] if c.diff_ci else None, "differs": c.differs,
                             "paper_source": c.paper_source, "cell": c.text(), "run": " ".join(c.runs)})
        return pd.DataFrame(rows)

    def display_frame(self):
        """The table as shown (strings), rows × columns."""
        import pandas as pd

        data = [[c.text() for c in row] for row in self.cells]
        return pd.DataFrame(data, index=pd.Index(self.row_labels, name=self.row_header),
                            columns=self.column_labels)

    def write(self, out_dir: str | Path | None = None) -> dict[str, Path]:
        out = Path(out_dir) if out_dir else paper_figures_dir() / "tables"
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{self.experiment}-{self.preset}"
        paths = {"md": out / f"{stem}.md", "tex": out / f"{stem}.tex", "csv": out / f"{stem}.csv"}
        _write_text(paths["md"], self.markdown())
        _write_text(paths["tex"], self.latex())
        _write_text(paths["csv"], self.frame().to_csv(index=False))
        write_json_atomic(out / f"{stem}.notes.json", {"notes": self.notes, "missing": self.missing,
                                                       "expected": self.expected})
        return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "−": r"$-$",
        "Δ": r"$\Delta$", "η": r"$\eta$", "—": "--", "…": r"\ldots{}"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _accuracy_ci(col: ColumnSpec, metrics: dict) -> tuple[float, float] | None:
    """The 95% interval of the first of the column's metric names the run reports, in display units."""
    lowered = {k.lower(): v for k, v in metrics.items()}
    for name in col.metric.lower().split("|"):
        if lowered.get(name) is not None:
            iv = accuracy_interval(lowered, name)
            return None if iv is None else (_display(col, iv[0]), _display(col, iv[1]))
    return None


def _row_label(exp: Experiment, key: tuple) -> str:
    t = exp.table
    assert t is not None
    values = dict(zip(t.rows, key))
    if t.row_format:
        try:
            scope = {**{k.lstrip("_"): v for k, v in values.items()}, **values}
            return t.row_format.format(**scope)
        except (KeyError, ValueError, TypeError, IndexError):
            pass
    return ", ".join(str(v) for v in key if v is not None) or "(all)"


def _summarise(values: list[Any]) -> str:
    vals = sorted({str(v) for v in values if v is not None})
    if not vals:
        return ""
    return vals[0] if len(vals) == 1 else ", ".join(vals[:6]) + (" …" if len(vals) > 6 else "")


def _relative_cells(t, cells: list[list[Cell]]) -> None:
    """Columns with `relative_to`: 100 × the row's mean / the named baseline row's mean (same pivot unless named)."""
    for j, c0 in enumerate(cells[0] if cells else []):
        c = c0.column
        if c.relative_to is None:
            continue
        base_rk = tuple(_norm(c.relative_to.get(r)) for r in t.rows)
        means = {(row[j].row, row[j].pivot): row[j].ours for row in cells}
        for row in cells:
            cell = row[j]
            pv = _norm(c.relative_to[t.pivot]) if t.pivot and t.pivot in c.relative_to else cell.pivot
            base = means.get((base_rk, pv))
            cell.ours = 100.0 * cell.ours / base if cell.ours is not None and base else None
            cell.std = None


def _compared_row(t, row_keys: list[tuple]) -> int | None:
    """Index of the row every other row is tested against: table.compare_to if this grid has it, else row 0."""
    if len(row_keys) < 2:
        return None
    if t.compare_to:
        want = {r: _norm(v) for r, v in t.compare_to.items()}
        for i, rk in enumerate(row_keys):
            if all(dict(zip(t.rows, rk)).get(r) == v for r, v in want.items()):
                return i
    return 0


def _paired_loss_interval(a_dir: Path, b_dir: Path, metric: str) -> tuple[float, float] | None:
    """95% interval of run a's minus run b's answer NLL (or log-perplexity, for ppl_heldout), paired over the items
    both scored (None unless both scored the same items with the same token counts)."""
    a, b = item_losses(a_dir, metric), item_losses(b_dir, metric)
    if not a or a.keys() != b.keys() or any(a[k][1] != b[k][1] for k in a):
        return None
    keys = sorted(a)
    r = paired_ratio_difference([a[k][0] for k in keys], [b[k][0] for k in keys], [a[k][1] for k in keys])
    return None if r is None else (r[1], r[2])


def _compare_cells(t, row_keys: list[tuple], cells: list[list[Cell]]) -> tuple[str, int, int] | None:
    """Fill each one-run accuracy or answer-NLL cell's interval of its difference from the compared row (same
    column); return the compared row's label values and how many accuracy and loss cells were compared, or None
    when no cell could be compared."""
    base_i = _compared_row(t, row_keys)
    if base_i is None:
        return None
    n_acc = n_loss = 0
    for i, row in enumerate(cells):
        if i == base_i:
            continue
        for cell, base in zip(row, cells[base_i]):
            col = cell.column
            names = col.metric.lower().split("|")
            if cell.eval_dir and base.eval_dir and names[0].startswith(PAIRED):
                iv = _paired_loss_interval(cell.eval_dir, base.eval_dir, names[0])
                if iv is not None:
                    cell.diff_ci = (iv[0] * col.scale, iv[1] * col.scale)
                    n_loss += 1
                continue
            if cell.ci is None or base.ci is None or cell.metrics is None or base.metrics is None:
                continue
            for name in names:
                iv = difference_interval(cell.metrics, base.metrics, name)
                if iv is not None:
                    cell.diff_ci = (_display(col, iv[0]), _display(col, iv[1]))  # fractions: |d| <= 1
                    n_acc += 1
                    break
    if not n_acc and not n_loss:
        return None
    return ", ".join(str(v) for v in row_keys[base_i] if v is not None), n_acc, n_loss


def build_table(exp: Experiment, preset: str | None, store: ResultsStore) -> TableResult:
    """The experiment's table for a preset, from recorded runs only."""
    if exp.table is None:
        raise ValueError(f"experiment {exp.name} declares no table")
    preset = preset or exp.default_preset
    t = exp.table
    pairs = records_for(exp, preset, store)
    # rows and pivots in plan order
    row_keys: list[tuple] = []
    pivots: list[Any] = []
    groups: dict[tuple, list[tuple[RunSpec, dict | None]]] = {}
    for spec, rec in pairs:
        rk = tuple(_norm(spec.value(r)) for r in t.rows)
        pv = _norm(spec.value(t.pivot)) if t.pivot else None
        if rk not in row_keys:
            row_keys.append(rk)
        if pv not in pivots:
            pivots.append(pv)
        groups.setdefault((rk, pv), []).append((spec, rec))
    recorded = [rec for _, rec in pairs if rec is not None]
    columns = [c for c in t.columns
               if not c.optional or any(metric_value(r["metrics"], c.metric) is not None for r in recorded)]
    refs = {}
    ref = exp.reference
    if ref:
        for e in ref.entries:
            rk = tuple(_norm(e.row.get(r)) for r in t.rows)
            pv = _norm(e.row.get(t.pivot)) if t.pivot else None
            for metric, v in e.values.items():  # keyed by the column's ref_key (its metric unless named)
                refs[(rk, pv, metric)] = (v, e.source or f"{ref.paper}, {ref.source}")
    col_labels: list[str] = []
    col_keys: list[tuple[Any, ColumnSpec]] = []
    for pv in pivots:
        for c in columns:
            label = c.display if not t.pivot else f"{c.display} @ {t.pivot_format.format(pv)}"
            col_labels.append(label)
            col_keys.append((pv, c))
    cells: list[list[Cell]] = []
    for rk in row_keys:
        row_cells = []
        for pv, c in col_keys:
            group = groups.get((rk, pv), [])
            unique_runs = {s.ref: rec for s, rec in group}
            recs = [r for r in unique_runs.values() if r is not None]
            vals = [metric_value(r["metrics"], c.metric) for r in recs]
            vals = [_display(c, v) for v in vals if v is not None]
            cell = Cell(rk, pv, c, n_runs=len(recs), n_expected=len(unique_runs),
                        runs=tuple(r["key"] for r in recs))
            if vals:
                cell.ours = statistics.fmean(vals)
                cell.std = statistics.stdev(vals) if len(vals) > 1 else None
            if c.stat == "std":  # the spread itself is the cell (e.g. DeFT Table 13's standard deviations)
                cell.ours, cell.std = cell.std, None
            elif len(recs) == 1 and c.pct and c.relative_to is None:
                cell.ci = _accuracy_ci(c, recs[0]["metrics"])
                cell.metrics = {k.lower(): v for k, v in recs[0]["metrics"].items()}
            elif len(recs) == 1 and c.relative_to is None and c.metric.lower().startswith(PAIRED):
                cell.eval_dir = store.run_dir(recs[0]["kind"], recs[0]["key"]) / "eval"
            if (rk, pv, c.ref_key) in refs:
                cell.paper, cell.paper_source = refs[(rk, pv, c.ref_key)]
            row_cells.append(cell)
        cells.append(row_cells)
    _relative_cells(t, cells)
    compared = _compare_cells(t, row_keys, cells)
    distinct = {s.ref: rec for s, rec in pairs}
    missing = sum(1 for rec in distinct.values() if rec is None)
    notes = table_notes(exp, preset, pairs, len(distinct), missing)
    if any(c.ci for row in cells for c in row):
        notes.append("Accuracies of one run show their 95% interval [low, high]: Wilson score on the set's problems; "
                     "Avg.: the pooled count for equal sets, else a normal approximation of the mean "
                     "(deftlab.scoring.intervals). † marks a paper number outside our interval")
    if compared is not None:
        label, n_acc, n_loss = compared
        marked = [c for row in cells for c in row if c.differs]
        if n_acc:
            notes.append(f"{DIFFERS} on an accuracy: its difference from the row '{label}' has a 95% interval that "
                         "excludes 0 (Newcombe's hybrid score interval on the two runs' counts, taken as "
                         f"independent; Avg.: pooled counts): {sum(c.ci is not None for c in marked)} cell(s) marked")
        if n_loss:
            notes.append(f"{DIFFERS} on an answer NLL or held-out perplexity: its difference from the row '{label}' has a 95% interval that "
                         "excludes 0 (paired over the same problems: the token-weighted mean of per-problem "
                         "differences, ratio-estimator variance over problems; deftlab.scoring.intervals."
                         f"paired_ratio_difference): {sum(c.ci is None for c in marked)} cell(s) marked; "
                         "the intervals are the CSV's diff_low/diff_high (for a held-out perplexity: of its log, "
                         "nats per token, paired over documents)")
    covered = {(rk, pv) for rk in row_keys for pv in pivots}
    if ref and ref.entries:
        outside = {(tuple(_norm(e.row.get(r)) for r in t.rows), _norm(e.row.get(t.pivot)) if t.pivot else None)
                   for e in ref.entries} - covered
        if outside:
            notes.append(f"{len(outside)} paper row/column combination(s) are not in this preset's grid "
                         "(see the 'paper' preset)")
    return TableResult(exp.name, preset, exp.title, t.row_header, [_row_label(exp, rk) for rk in row_keys],
                       col_labels, cells, notes, missing, len(distinct))


def _dotted(data: dict, path: str):
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _value_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) if v else "none"
    return str(v)


def config_notes(records: list[dict]) -> list[str]:
    """What the recorded runs used, from their resolved configs (params where a record has no config)."""
    parts = []
    with_config = [r for r in records if isinstance(r.get("config"), dict)]
    for path, label in CONFIG_NOTES:
        vals = [_value_text(v) for r in with_config if (v := _dotted(r["config"], path)) is not None]
        if vals:
            parts.append(f"{label} = {_summarise(vals)}"
                         + (f" ({len(vals)} of {len(records)} runs)" if len(vals) < len(records) else ""))
    notes = [f"Runs used (their records' resolved configs): {'; '.join(parts)}"] if parts else []
    bare = [r for r in records if not isinstance(r.get("config"), dict)]
    parts = []
    for name in SUBSET_PARAMS:
        vals = [_value_text(r["params"][name]) for r in bare if name in (r.get("params") or {})]
        if vals:
            parts.append(f"{name} = {_summarise(vals)}")
    if parts:
        notes.append(f"Runs used ({len(bare)} runs' params; their records hold no resolved config): "
                     + "; ".join(parts))
    return notes


def commit_note(records: list[dict]) -> str | None:
    """Which git commits the records came from, e.g. "Records: 12 runs from git commits 7595a64 (10), ..."."""
    counts: dict[str, int] = {}
    for r in records:
        c = (r.get("manifest") or {}).get("git_commit") or "unknown"
        c = c[:7] + ("+dirty" if c.endswith("+dirty") else "") if c != "unknown" else c
        counts[c] = counts.get(c, 0) + 1
    if not counts:
        return None
    parts = [f"{c} ({n})" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return f"Records: {len(records)} runs from git commit(s) {', '.join(parts)}; `deftlab show KEY` prints one"


def table_notes(exp: Experiment, preset: str, pairs: list[tuple[RunSpec, dict | None]], n_runs: int,
                missing: int) -> list[str]:
    t = exp.table
    assert t is not None
    p = exp.presets.get(preset)
    notes = [f"Source: {exp.source.paper}, {exp.source.item}",
             f"Preset: {preset}" + (f" — {p.description}" if p and p.description else "")]
    models = sorted({str(s.params.get("model")) for s, _ in pairs if s.params.get("model") is not None})
    if models:
        notes.append("Model: " + ", ".join(models))
    recorded = list({rec["key"]: rec for _, rec in pairs if rec is not None}.values())
    notes += config_notes(recorded)
    commits = commit_note(recorded)
    if commits:
        notes.append(commits)
    for name in t.note_metrics:
        vals = [rec["metrics"].get(name) for rec in recorded if rec["metrics"].get(name) is not None]
        if vals:
            notes.append(f"Evaluated: {name} = {_summarise(vals)} (from the runs' metrics)")
    run_notes: list[str] = []
    for rec in recorded:
        for n in rec["metrics"].get("notes", []) or []:
            if isinstance(n, str) and n not in run_notes:
                run_notes.append(n)
    notes += [f"Run note: {n}" for n in run_notes[:10]]
    ref = exp.reference
    if ref is None or not ref.entries:
        why = (ref.note if ref and ref.note else "paper numbers not available here")
        notes.append(f"Paper column: none — {why}")
    else:
        notes.append(f"Paper numbers: {ref.paper}, {ref.source}" + (f" ({ref.url})" if ref.url else "")
                     + (f"; backbone {ref.model}" if ref.model else ""))
        if ref.note:  # the paper's own caveats (shifted labels, sums that do not add up), never corrected
            notes.append(f"About the paper's numbers: {ref.note}")
        if ref.model and models and models != [ref.model]:
            notes.append(f"The paper's numbers come from {ref.model}, a different (larger) model than this "
                         f"preset's {', '.join(models)}: compare trends and differences, not absolute values")
    if ref and ref.claims:
        notes += [f"Paper claim: {c}" for c in ref.claims]
    notes += t.notes
    notes.append(LEGEND)
    if missing:
        notes.append(f"{missing} of {n_runs} runs are not recorded and show as '{MISSING}' "
                     f"(run: deftlab run {exp.name} --preset {preset})")
    return notes
