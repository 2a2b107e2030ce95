"""Expand an experiment × preset into runs and execute only the ones the results store lacks.

Each run is a `RunSpec` (kind, resolved params, key = hash of both). Execution writes into an in-flight directory
that is renamed into place on success, so a crash loses at most the run in flight; a failed run is kept aside with
its traceback and never replaces a recorded result. Re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deftlab.config import ConfigError
from deftlab.errors import DeftlabError
from deftlab.experiments.kinds import get_kind
from deftlab.experiments.registry import Experiment, deep_merge
from deftlab.experiments.store import ResultsStore, run_key
from deftlab.manifest import build_manifest

_TEMPLATE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class RunFailedError(DeftlabError):
    pass


@dataclass(frozen=True)
class RunSpec:
    kind: str
    params: dict  # what is hashed and recorded; a dependency appears as "@<kind>/<key>"
    key: str
    labels: dict = field(default_factory=dict)  # "_name" values: table rows / figure series, not hashed
    refs: dict = field(default_factory=dict)  # param name -> RunSpec this run depends on
    experiment: str | None = None
    preset: str | None = None
    fingerprint: dict = field(default_factory=dict)  # the kind's extra key material (e.g. preset file hash)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.key}"

    def value(self, name: str, default: Any = None) -> Any:
        """A label or param by name (labels first)."""
        if name in self.labels:
            return self.labels[name]
        return self.params.get(name, default)

    def describe(self, width: int = 100) -> str:
        shown = {**self.labels, **{k: v for k, v in self.params.items()}}
        text = " ".join(f"{k}={_short(v)}" for k, v in shown.items())
        return text if len(text) <= width else text[: width - 1] + "…"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{…}"
    return str(v)


# --- expansion -------------------------------------------------------------------------------------------------
def _substitute(value: Any, scope: dict, where: str) -> Any:
    if isinstance(value, str):
        m = _TEMPLATE.match(value)
        if m:
            name = m.group(1)
            if name not in scope:
                raise ConfigError(f"{where}: '{value}' names param '{name}', which this run does not have",
                                  f"define '{name}' in base/grid, or remove the template")
            return copy.deepcopy(scope[name])
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, scope, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, scope, where) for v in value]
    return value


def _resolve_templates(params: dict, where: str) -> dict:
    for _ in range(8):  # templates may name params that are templates themselves
        new = {k: _substitute(v, params, where) for k, v in params.items()}
        if new == params:
            return new
        params = new
    raise ConfigError(f"{where}: '${{...}}' templates refer to each other in a loop")


def _is_ref(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"ref"} and isinstance(v["ref"], dict)


def make_spec(kind: str, params: dict, *, experiment: str | None = None, preset: str | None = None,
              where: str = "run") -> RunSpec:
    """Build a RunSpec from raw params: split labels, resolve templates and dependencies, hash."""
    params = copy.deepcopy(params)
    kind = params.pop("kind", kind)
    kind_spec = get_kind(kind)
    labels = {k: params.pop(k) for k in list(params) if k.startswith("_")}
    params = _resolve_templates(params, where)
    # null removes a param (e.g. a dense baseline drops the decomposition settings it does not use)
    params = {k: v for k, v in params.items() if v is not None}
    labels = {k: _substitute(v, params, where) for k, v in labels.items() if v is not None}
    refs: dict[str, RunSpec] = {}
    for name, value in list(params.items()):
        if _is_ref(value):
            r = value["ref"]
            if "kind" not in r:
                raise ConfigError(f"{where}: ref '{name}' needs a kind", "write {ref: {kind: ..., params: {...}}}")
            extra = set(r) - {"kind", "params"}
            if extra:
                raise ConfigError(f"{where}: ref '{name}' has unknown key(s) {sorted(extra)}",
                                  "a ref takes only kind and params")
            dep = make_spec(r["kind"], r.get("params") or {}, experiment=experiment, preset=preset,
                            where=f"{where}.{name}")
            refs[name] = dep
            params[name] = "@" + dep.ref
    fp = kind_spec.fingerprint(params) if kind_spec.fingerprint else {}
    return RunSpec(kind, params, run_key(kind, params, fp), labels, refs, experiment, preset, fp)


def _axis_items(axis: str, value: Any) -> dict:
    return copy.deepcopy(value) if isinstance(value, dict) else {axis: value}


def expand(exp: Experiment, preset: str | None = None) -> list[RunSpec]:
    """All runs of an experiment under a preset, in grid order (duplicate keys are kept: rows may share runs)."""
    preset = preset or exp.default_preset
    p = exp.preset(preset)
    base = deep_merge(exp.base, p.base)
    grid = dict(exp.grid)
    for axis, values in p.grid.items():
        if values is None:
            grid.pop(axis, None)
        else:
            grid[axis] = values
    explicit = p.runs if p.runs is not None else exp.runs
    raw: list[dict] = []
    if grid:
        axes = list(grid.items())
        for combo in itertools.product(*(values for _, values in axes)):
            params = base
            for (axis, _), value in zip(axes, combo):
                params = deep_merge(params, _axis_items(axis, value))
            raw.append(params)
    for run in explicit:
        raw.append(deep_merge(base, run))
    if not raw:
        raw.append(copy.deepcopy(base))
    return [make_spec(exp.kind, r, experiment=exp.name, preset=preset, where=f"{exp.name}[{preset}] run {i}")
            for i, r in enumerate(raw)]


def unique(specs: list[RunSpec]) -> list[RunSpec]:
    seen: set[str] = set()
    out = []
    for s in specs:
        if s.ref not in seen:
            seen.add(s.ref)
            out.append(s)
    return out


# --- planning --------------------------------------------------------------------------------------------------
@dataclass
class PlanItem:
    spec: RunSpec
    state: str  # done | missing | corrupt
    cost_s: float | None


def cost_per_run(exp: Experiment | None, preset: str | None, kind: str) -> float | None:
    if exp is not None and exp.kind == kind and preset in exp.presets and exp.presets[preset].cost_s is not None:
        return exp.presets[preset].cost_s
    return get_kind(kind).cost(preset) if preset else None


def plan(exp: Experiment, preset: str | None, store: ResultsStore) -> list[PlanItem]:
    """Every distinct run the experiment needs (dependencies first) with its state in the store."""
    preset = preset or exp.default_preset
    ordered: list[RunSpec] = []

    def visit(s: RunSpec) -> None:
        for dep in s.refs.values():
            visit(dep)
        ordered.append(s)

    for s in expand(exp, preset):
        visit(s)
    return [PlanItem(s, store.status(s.kind, s.key).state, cost_per_run(exp, preset, s.kind))
            for s in unique(ordered)]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(exp: Experiment, preset: str, items: list[PlanItem], store: ResultsStore) -> str:
    lines = [f"{exp.name} [{preset}]: {exp.title}", f"results: {store.root}"]
    for it in items:
        lines.append(f"  {it.state:8s} {it.spec.ref:24s} {it.spec.describe()}")
    todo = [it for it in items if it.state != "done"]
    known = [it.cost_s for it in todo if it.cost_s is not None]
    total = sum(known) if len(known) == len(todo) else None
    est = format_duration(total) if todo else "0 s"
    if todo and total is None and known:
        est = f"at least {format_duration(sum(known))} (no cost model for some kinds)"
    lines.append(f"{len(items)} runs: {len(items) - len(todo)} done, {len(todo)} to run; "
                 f"estimated time for the missing runs: {est} (cost model for preset '{preset}')")
    return "\n".join(lines)


# --- execution -------------------------------------------------------------------------------------------------
@dataclass
class RunReport:
    ran: list[RunSpec] = field(default_factory=list)
    skipped: list[RunSpec] = field(default_factory=list)
    failed: list[tuple[RunSpec, str]] = field(default_factory=list)


def _call_params(spec: RunSpec, store: ResultsStore) -> dict:
    params = copy.deepcopy(spec.params)
    for name, dep in spec.refs.items():
        rec = store.load(dep.kind, dep.key)
        if rec is None:
            raise RunFailedError(f"run {spec.ref} needs {dep.ref}, which is not recorded",
                                 "run the dependency first (the runner normally does)")
        params[name] = {"ref": dep.ref, "dir": str(store.run_dir(dep.kind, dep.key).resolve()),
                        "params": rec.get("params", {}), "metrics": rec.get("metrics", {})}
    return params


def _seed_of(spec: RunSpec) -> int | None:
    """The run's seed: its `seed` param, else the seed of the training preset file it names."""
    if "seed" in spec.params:
        return spec.params["seed"]
    if spec.fingerprint.get("preset_config"):
        from deftlab.config import load_yaml
        from deftlab.paths import configs_dir

        try:
            return load_yaml(configs_dir() / "presets" / f"{spec.params['preset']}.yaml").get("seed")
        except DeftlabError:
            return None
    return None


def execute(spec: RunSpec, store: ResultsStore, *, force: bool = False,
            progress: Callable[[str], None] | None = None) -> dict:
    """Record one run (its dependencies first) unless it is already recorded; returns the record."""
    say = progress or (lambda _m: None)
    for dep in spec.refs.values():
        execute(dep, store, force=False, progress=progress)
    state = store.status(spec.kind, spec.key)
    if state.state == "done" and not force:
        return store.load(spec.kind, spec.key)  # type: ignore[return-value]
    if state.state == "corrupt":
        moved = store.set_aside(spec.kind, spec.key, "corrupt")
        say(f"warning: {spec.ref}: record.json is unreadable ({state.detail}); moved it aside to {moved} "
            "and re-running")
    fn = get_kind(spec.kind).resolve()
    params = _call_params(spec, store)
    config = {"kind": spec.kind, "params": spec.params, "labels": spec.labels, "experiment": spec.experiment,
              "preset": spec.preset, "fingerprint": spec.fingerprint}
    partial = store.begin(spec.kind, spec.key)
    started = time.time()
    try:
        metrics = fn(params, partial)
        if not isinstance(metrics, dict):
            raise TypeError(f"run function of kind '{spec.kind}' returned {type(metrics).__name__}, not a dict")
        manifest = build_manifest(config, _seed_of(spec), extra={"run": spec.ref})
        finished = time.time()
        artifacts = sorted(str(p.relative_to(partial)) for p in partial.rglob("*")
                           if p.is_file() and not p.name.startswith("."))
        record = {"key": spec.key, "kind": spec.kind, "params": spec.params, "metrics": metrics,
                  "status": "ok", "experiment": spec.experiment, "preset": spec.preset, "labels": spec.labels,
                  "refs": {k: d.ref for k, d in spec.refs.items()}, "fingerprint": spec.fingerprint,
                  "started_at": manifest["created_at"], "duration_s": round(finished - started, 3),
                  "artifacts": artifacts, "manifest": manifest}
        store.commit(spec.kind, spec.key, partial, record, manifest)
    except BaseException as e:  # KeyboardInterrupt too: keep what the run wrote, then re-raise
        where = store.fail(spec.kind, spec.key, partial, e, {"config": config, "error": repr(e)})
        if isinstance(e, Exception):
            raise RunFailedError(f"run {spec.ref} failed: {type(e).__name__}: {e} (details in {where})",
                                 "fix the cause and re-run; recorded runs are kept") from e
        raise
    return record


def run_experiment(exp: Experiment, preset: str | None, store: ResultsStore, *, force: bool = False,
                   keep_going: bool = False, progress: Callable[[str], None] | None = None) -> RunReport:
    """Run what is missing (everything with force=True); stop at the first failure unless keep_going."""
    preset = preset or exp.default_preset
    say = progress or (lambda _m: None)
    report = RunReport()
    top = {s.ref for s in expand(exp, preset)}
    items = plan(exp, preset, store)
    todo = [it for it in items if it.state != "done" or (force and it.spec.ref in top)]
    for it in items:
        if it not in todo:
            report.skipped.append(it.spec)
    for i, it in enumerate(todo, 1):
        spec = it.spec
        say(f"[{i}/{len(todo)}] {spec.ref} {spec.describe(80)}")
        t0 = time.time()
        try:
            execute(spec, store, force=force and spec.ref in top, progress=say)
        except DeftlabError as e:  # a failed run, or a kind that cannot run here (missing module)
            report.failed.append((spec, str(e)))
            say(f"  failed: {e}")
            if not keep_going:
                raise
            continue
        report.ran.append(spec)
        say(f"  done in {time.time() - t0:.1f} s")
    return report


def records_for(exp: Experiment, preset: str | None, store: ResultsStore) -> list[tuple[RunSpec, dict | None]]:
    """Each planned (top-level) run with its record, or None where it is missing."""
    return [(s, store.load(s.kind, s.key)) for s in expand(exp, preset or exp.default_preset)]


def run_dir_of(spec: RunSpec, store: ResultsStore) -> Path:
    return store.run_dir(spec.kind, spec.key)
