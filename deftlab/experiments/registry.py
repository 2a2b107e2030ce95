"""The experiment registry: every paper table and figure declared as data in experiments/<name>.yaml.

An experiment says what to run (a run `kind`, `base` params, a `grid` and/or explicit `runs`), how each preset
changes that (`presets`), how to lay the results out (`table`, `figure`) and what the paper reported
(`reference`, with its source). Files whose name starts with "_" are shared templates that experiments
`extends:`; they are deep-merged under the experiment (mappings merge, lists and scalars are replaced).

Param conventions (see experiments/README.md):
- a grid axis whose values are mappings merges each mapping into the params (a "bundle" axis);
- keys starting with "_" are labels (row names for tables, series names for figures): they are neither hashed
  nor passed to the run function;
- the key `kind` inside a bundle or an explicit run selects another run kind for that run;
- a whole-string value "${name}" is replaced by the run's top-level param `name`;
- `{ref: {kind: K, params: {...}}}` makes the run depend on another run, recorded first.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deftlab.config import ConfigError, from_dict, load_yaml
from deftlab.errors import UnknownNameError
from deftlab.experiments.kinds import get_kind
from deftlab.paths import REPO_ROOT, experiments_dir

PRESETS = ("smoke", "cpu-small", "gpu", "paper")
DEFAULT_PRESET = "cpu-small"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass
class SourceSpec:
    paper: str
    item: str  # "Table 1", "Figure 5b"
    url: str | None = None


@dataclass
class ColumnSpec:
    metric: str  # a metrics key; "a|b" tries a, then b (metric names are matched case-insensitively)
    label: str | None = None
    fmt: str = "{:.2f}"
    scale: float = 1.0
    pct: bool = False  # values <= 1 are fractions: shown ×100
    std: bool = False  # show ± the standard deviation over the runs of a row (e.g. seeds)
    optional: bool = False  # drop the column when no recorded run has the metric
    stat: Literal["mean", "std"] = "mean"  # std: the cell is the standard deviation over the row's runs (seeds)
    # the cell is 100 × this row's mean / the mean of the row (and pivot, if given; else the same pivot) named here,
    # e.g. {_setting: QLoRA}: "relative to QLoRA = 100%" (DeFT Figures 5b, 7)
    relative_to: dict[str, Any] | None = None
    key: str | None = None  # the name reference entries give this column (default: metric); tells apart columns
    #                         of one metric (mean, std, relative)

    @property
    def ref_key(self) -> str:
        return self.key or self.metric

    def validate(self) -> None:
        if not self.metric.strip():
            raise ConfigError("table column: empty metric name")
        if self.stat == "std" and self.relative_to is not None:
            raise ConfigError(f"table column {self.metric}: stat std with relative_to", "use one of them")
        try:
            self.fmt.format(1.0)
        except (ValueError, IndexError, KeyError) as e:
            raise ConfigError(f"table column {self.metric}: bad format {self.fmt!r} ({e})",
                              "use a str.format spec such as '{:.2f}'") from e

    @property
    def display(self) -> str:
        return self.label or self.metric.split("|")[0]


@dataclass
class TableSpec:
    rows: list[str]  # params/labels whose values identify a row, e.g. ["_setting"] or ["method", "keep"]
    columns: list[ColumnSpec]
    row_format: str | None = None  # e.g. "{method} {keep:.0%}"; default joins the row values
    row_header: str = "setting"
    pivot: str | None = None  # a param spread over column groups (batch size, ERR, context length)
    pivot_format: str = "{}"
    note_metrics: list[str] = field(default_factory=list)  # metrics summarised in the header notes
    notes: list[str] = field(default_factory=list)
    # the row whose accuracies every other row's are tested against (e.g. {_setting: QLoRA}); when a preset's
    # grid lacks it, the first row
    compare_to: dict[str, Any] | None = None

    def validate(self) -> None:
        if not self.rows:
            raise ConfigError("table.rows is empty", "name the param(s) that identify a row")
        if not self.columns:
            raise ConfigError("table.columns is empty", "list at least one metric column")
        keys = [c.ref_key for c in self.columns]
        if len(set(keys)) < len(keys):
            raise ConfigError("table.columns: two columns share a metric", "give one of them its own `key`")
        for c in self.columns:
            if c.relative_to and not set(c.relative_to) <= set(self.rows) | ({self.pivot} if self.pivot else set()):
                raise ConfigError(f"table column {c.ref_key}: relative_to names {sorted(c.relative_to)}",
                                  "name only the table's row keys (and its pivot)")
        if self.compare_to and not set(self.compare_to) <= set(self.rows):
            raise ConfigError(f"table.compare_to names {sorted(self.compare_to)}", "name only the table's row keys")


@dataclass
class ReferenceEntry:
    row: dict[str, Any]  # the row's param/label values (plus the pivot param, if the table has one)
    values: dict[str, float]  # column metric -> the paper's number, in the table's display units
    source: str | None = None  # where exactly (overrides the reference's source)


@dataclass
class ReferenceSpec:
    paper: str = ""
    source: str = ""  # "Table 1"
    url: str | None = None
    model: str | None = None  # the backbone the paper's numbers are for
    note: str = ""
    entries: list[ReferenceEntry] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)  # quoted statements (e.g. from the abstract), not cells


@dataclass
class FigureSpec:
    type: Literal["line", "layers"] = "line"
    x: str | None = None  # a param, label or metric
    y: list[str] = field(default_factory=list)  # metrics (one panel each); for "layers": CSV columns
    series: list[str] = field(default_factory=list)  # params/labels that split lines
    xlabel: str | None = None
    ylabel: str | None = None
    title: str | None = None
    logx: bool = False
    artifact: str | None = None  # "layers": the per-matrix CSV in the run directory
    layer_column: str = "layer"
    group_column: str | None = "matrix"

    def validate(self) -> None:
        if self.type == "line" and (not self.x or not self.y):
            raise ConfigError("figure (line): needs x and y", "name the x param and the y metric(s)")
        if self.type == "layers" and (not self.artifact or not self.y):
            raise ConfigError("figure (layers): needs artifact and y", "name the per-matrix CSV and its columns")


@dataclass
class PresetSpec:
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)  # deep-merged over the experiment's base
    grid: dict[str, list[Any] | None] = field(default_factory=dict)  # replaces axes; null drops an axis
    runs: list[dict[str, Any]] | None = None  # replaces the explicit runs
    cost_s: float | None = None  # seconds per run for --dry-run (default: the kind's cost model)


@dataclass
class Experiment:
    name: str
    title: str
    source: SourceSpec
    kind: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    presets: dict[str, PresetSpec] = field(default_factory=dict)
    default_preset: str = DEFAULT_PRESET
    table: TableSpec | None = None
    reference: ReferenceSpec | None = None
    figure: FigureSpec | None = None
    notes: list[str] = field(default_factory=list)
    extends: str | None = None
    path: str | None = None  # set by the loader

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"experiment name {self.name!r} is not a lowercase slug", "use e.g. 'table1'")
        get_kind(self.kind)
        for axis, values in self.grid.items():
            _check_axis(self.name, axis, values)
        if self.default_preset not in self.presets:
            raise ConfigError(f"experiment {self.name}: default_preset '{self.default_preset}' is not defined",
                              f"define presets.{self.default_preset} or change default_preset")
        for pname, p in self.presets.items():
            for axis, values in p.grid.items():
                if values is not None:
                    _check_axis(f"{self.name} preset {pname}", axis, values)
        if self.reference and self.reference.entries:
            if not self.table:
                raise ConfigError(f"experiment {self.name}: reference entries need a table layout")
            keys = set(self.table.rows) | ({self.table.pivot} if self.table.pivot else set())
            metrics = {c.ref_key for c in self.table.columns}
            for i, e in enumerate(self.reference.entries):
                if set(e.row) != keys:
                    raise ConfigError(f"experiment {self.name}: reference.entries[{i}].row keys {sorted(e.row)} "
                                      f"differ from the table's row keys {sorted(keys)}")
                extra = set(e.values) - metrics
                if extra:
                    raise ConfigError(f"experiment {self.name}: reference.entries[{i}] has values for "
                                      f"{sorted(extra)}, which are not table columns")

    def preset(self, name: str | None) -> PresetSpec:
        name = name or self.default_preset
        if name not in self.presets:
            raise UnknownNameError("preset", name, self.presets)
        return self.presets[name]


def _check_axis(where: str, axis: str, values: Any) -> None:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: grid axis '{axis}' must be a non-empty list")
    kinds = {isinstance(v, dict) for v in values}
    if len(kinds) > 1:
        raise ConfigError(f"{where}: grid axis '{axis}' mixes mappings and plain values",
                          "use either plain values or one mapping per value")


def deep_merge(base: Any, over: Any) -> Any:
    """Mappings merge recursively; anything else in `over` replaces `base`."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = deep_merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


# --- loading ---------------------------------------------------------------------------------------------------
def _dir(directory: str | os.PathLike | None) -> Path:
    return Path(directory) if directory else experiments_dir()


def experiment_names(directory: str | os.PathLike | None = None) -> list[str]:
    d = _dir(directory)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.yaml") if not p.name.startswith("_"))


def _raw(path: Path, seen: tuple[str, ...] = ()) -> dict:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level", "see experiments/README.md")
    parent = data.get("extends")
    if parent:
        if parent in seen:
            raise ConfigError(f"{path}: 'extends' loops through {parent}")
        ppath = path.parent / f"{parent}.yaml"
        if not ppath.is_file():
            raise ConfigError(f"{path}: extends '{parent}', but {ppath} does not exist",
                              "name a template file in the same directory, without .yaml")
        merged = deep_merge(_raw(ppath, seen + (parent,)), data)
        merged["extends"] = parent
        return merged
    return data


def load_experiment(name: str, directory: str | os.PathLike | None = None) -> Experiment:
    d = _dir(directory)
    path = d / f"{name}.yaml"
    if name.startswith("_") or not path.is_file():
        raise UnknownNameError("experiment", name, experiment_names(d))
    data = _raw(path)
    data.setdefault("name", name)
    if data["name"] != name:
        raise ConfigError(f"{path}: name '{data['name']}' differs from the file name '{name}'",
                          "make them equal")
    try:
        exp = from_dict(Experiment, data, where=path.name)
    except ConfigError as e:
        if path.name in str(e):
            raise
        raise ConfigError(f"{path.name}: {e.problem}", e.fix) from e
    exp.path = str(path)
    return exp


def load_all(directory: str | os.PathLike | None = None) -> dict[str, Experiment]:
    return {n: load_experiment(n, directory) for n in experiment_names(directory)}


def paper_figures_dir() -> Path:
    """Where tables and figures are written: $DEFTLAB_PAPER_FIGURES, else the checkout's paper_figures/."""
    env = os.environ.get("DEFTLAB_PAPER_FIGURES")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "experiments").is_dir():
        return REPO_ROOT / "paper_figures"
    return Path.cwd() / "paper_figures"
