"""Expand an experiment × preset into runs and execute only the ones the results store lacks.

Each run is a `RunSpec` (kind, resolved params, key = hash of both). Execution claims the run's in-flight
directory with a lease (deftlab.store.lease) and the store renames it into place on success. A run another live
process holds is left to it (and waited for at the end); an interrupted run (its lease stale) is resumed inside
its own directory, so a fine-tuning run continues from its last checkpoint. A failed run is kept aside with its
traceback and never replaces a recorded result. Re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deftlab.config import ConfigError
from deftlab.errors import DeftlabError
from deftlab.experiments.kinds import get_kind
from deftlab.experiments.registry import Experiment, deep_merge
from deftlab.store import LeaseLostError, ResultsStore, RunInProgressError, run_key
from deftlab.store.lease import launch_id, lease_state, lease_timeout
from deftlab.train.distributed import global_rank, is_global_zero

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
    busy: list[RunSpec] = field(default_factory=list)  # held by other processes (run_experiment with wait=False)


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


def _seed_of(spec: RunSpec, config: dict | None) -> int | None:
    """The run's seed: its `seed` param, else the one its resolved config holds (e.g. the training profile's)."""
    if "seed" in spec.params:
        return spec.params["seed"]
    config = config or {}
    return config.get("seed", (config.get("training_profile") or {}).get("seed"))


def _command() -> str:
    return " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])


def execute(spec: RunSpec, store: ResultsStore, *, force: bool = False,
            progress: Callable[[str], None] | None = None, options: dict | None = None) -> dict:
    """Record one run (its dependencies first) unless it is already recorded; returns the record.

    `options` are keyword arguments for the run function that do not change what it computes (progress bars,
    W&B mode). Raises RunInProgressError when another live process holds the run (or a dependency).
    In a launched process other than rank 0 (torchrun) see `_execute_on_other_rank`."""
    if not is_global_zero():
        return _execute_on_other_rank(spec, store, force=force, options=options)
    say = progress or (lambda _m: None)
    for dep in spec.refs.values():
        execute(dep, store, force=False, progress=progress)
    state = store.status(spec.kind, spec.key)
    if state.state == "done" and not force:
        return store.load(spec.kind, spec.key)  # type: ignore[return-value]
    kind = get_kind(spec.kind)
    fn = kind.resolve()
    params = _call_params(spec, store)
    config = kind.resolved_config(params)  # validates the params before anything is claimed
    lease = store.claim(spec.kind, spec.key)
    if lease.attempt > 1:
        say(f"  resuming {spec.ref} in place (attempt {lease.attempt})")
    if state.state == "corrupt":
        moved = store.set_aside(spec.kind, spec.key, "corrupt")
        say(f"warning: {spec.ref}: record.json is unreadable ({state.detail}); moved it aside to {moved} "
            "and re-running")
    started = time.time()
    try:
        metrics = fn(params, lease.run_dir, **(options or {}))
        if not isinstance(metrics, dict):
            raise TypeError(f"run function of kind '{spec.kind}' returned {type(metrics).__name__}, not a dict")
        origin = {"experiment": spec.experiment, "preset": spec.preset, "labels": spec.labels,
                  "command": _command()}
        return store.commit(spec.kind, spec.key, lease, params=spec.params, metrics=metrics, config=config,
                            fingerprint=spec.fingerprint, refs={k: d.ref for k, d in spec.refs.items()},
                            origin=origin, seed=_seed_of(spec, config), started=started)
    except (KeyboardInterrupt, SystemExit):
        lease.release()  # keep the directory: the next run resumes it
        raise
    except LeaseLostError:
        lease.stop()  # the directory is another process's now: leave it to that process
        raise
    except BaseException as e:
        where = store.fail(spec.kind, spec.key, lease, e, {"kind": spec.kind, "params": spec.params,
                                                           "error": repr(e)})
        if isinstance(e, Exception):
            raise RunFailedError(f"run {spec.ref} failed: {type(e).__name__}: {e} (details in {where})",
                                 "fix the cause and re-run; recorded runs are kept") from e
        raise


def _training_world_size(config: dict | None) -> int:
    profile = (config or {}).get("training_profile") or {}
    return int(profile.get("devices", 1)) * int(profile.get("num_nodes", 1))


def _execute_on_other_rank(spec: RunSpec, store: ResultsStore, *, force: bool = False,
                           options: dict | None = None) -> dict:
    """A launched process other than rank 0 (torchrun: every process runs the command). It joins the runs whose
    training profile spans several processes, inside the directory its rank 0 claimed, and never claims, records
    or reports a failure; every other run is rank 0's alone. Returns the run's record when it is already recorded,
    else an unrecorded stand-in ("recorded": False) holding what the run function returned."""
    for dep in spec.refs.values():  # rank 0 records them (waiting here until it has)
        while store.status(dep.kind, dep.key).state != "done":
            time.sleep(min(_poll_interval(), 1.0))
    if store.status(spec.kind, spec.key).state == "done" and not force:
        return store.load(spec.kind, spec.key)  # type: ignore[return-value]
    kind = get_kind(spec.kind)
    params = _call_params(spec, store)
    stand_in = {"kind": spec.kind, "key": spec.key, "params": spec.params, "metrics": {}, "recorded": False,
                "rank": global_rank()}
    if _training_world_size(kind.resolved_config(params)) == 1:
        return stand_in
    run_dir = _wait_for_claim(spec, store)
    stand_in["metrics"] = kind.resolve()(params, run_dir, **(options or {}))
    return stand_in


def _wait_for_claim(spec: RunSpec, store: ResultsStore) -> Path:
    """The in-flight directory once this launch's rank 0 holds its lease. Creating it first would make rank 0
    see a run in progress; another launch's (or a crashed attempt's) lease is not ours to join."""
    partial = store.partial_dir(spec.kind, spec.key)
    ours, deadline = launch_id(), time.time() + lease_timeout()
    while time.time() < deadline:
        state, lease, _ = lease_state(partial)
        if state == "fresh" and lease is not None and lease.get("launch") == ours:
            return partial
        time.sleep(0.2)
    raise RunFailedError(f"rank {global_rank()}: rank 0 did not start run {spec.ref} within {lease_timeout():.0f} s",
                         "check rank 0's output; every process must run the same command")


POLL_ENV = "DEFTLAB_POLL_S"


def _poll_interval() -> float:
    try:
        return max(0.05, float(os.environ.get(POLL_ENV, "10")))
    except ValueError:
        return 10.0


def execute_waiting(spec: RunSpec, store: ResultsStore, *, force: bool = False,
                    progress: Callable[[str], None] | None = None, options: dict | None = None) -> dict:
    """`execute`, waiting (polling every DEFTLAB_POLL_S s) while another live process holds the run: returns its
    record once that process has recorded it, or runs it here once that process's lease is stale."""
    say = progress or (lambda _m: None)
    while True:
        try:
            return execute(spec, store, force=force, progress=progress, options=options)
        except RunInProgressError as e:
            say(f"  {e}; waiting for it")
            time.sleep(_poll_interval())
            if store.status(spec.kind, spec.key).state == "done":
                return store.load(spec.kind, spec.key)  # type: ignore[return-value]


def run_experiment(exp: Experiment, preset: str | None, store: ResultsStore, *, force: bool = False,
                   keep_going: bool = False, progress: Callable[[str], None] | None = None,
                   wait: bool = True) -> RunReport:
    """Run what is missing (everything with force=True); stop at the first failure unless keep_going.

    Runs another live process holds are skipped at first; with `wait` they are polled (every DEFTLAB_POLL_S
    seconds) until they are recorded, or until their lease goes stale, when this process takes them over."""
    preset = preset or exp.default_preset
    say = progress or (lambda _m: None)
    report = RunReport()
    top = {s.ref for s in expand(exp, preset)}
    items = plan(exp, preset, store)
    todo = [it for it in items if it.state != "done" or (force and it.spec.ref in top)]
    for it in items:
        if it not in todo:
            report.skipped.append(it.spec)
    queue = [(i, it.spec) for i, it in enumerate(todo, 1)]
    while queue:
        deferred = []
        for i, spec in queue:
            say(f"[{i}/{len(todo)}] {spec.ref} {spec.describe(80)}")
            t0 = time.time()
            before = store.status(spec.kind, spec.key).state
            try:
                execute(spec, store, force=force and spec.ref in top and before == "done", progress=say)
            except RunInProgressError as e:
                say(f"  {e}; doing the other runs first")
                deferred.append((i, spec))
                continue
            except DeftlabError as e:  # a failed run, or a kind that cannot run here (missing module)
                report.failed.append((spec, str(e)))
                say(f"  failed: {e}")
                if not keep_going:
                    raise
                continue
            report.ran.append(spec)
            say(f"  done in {time.time() - t0:.1f} s")
        if deferred and not wait:
            report.busy = [s for _, s in deferred]
            break
        if deferred:
            time.sleep(_poll_interval())
            # runs another process finished meanwhile are done: skip them, keep waiting for the rest
            queue = []
            for i, spec in deferred:
                if store.status(spec.kind, spec.key).state == "done":
                    say(f"[{i}/{len(todo)}] {spec.ref} recorded by another process")
                    report.skipped.append(spec)
                else:
                    queue.append((i, spec))
        else:
            queue = []
    return report


def records_for(exp: Experiment, preset: str | None, store: ResultsStore) -> list[tuple[RunSpec, dict | None]]:
    """Each planned (top-level) run with its record, or None where it is missing."""
    return [(s, store.load(s.kind, s.key)) for s in expand(exp, preset or exp.default_preset)]


def run_dir_of(spec: RunSpec, store: ResultsStore) -> Path:
    return store.run_dir(spec.kind, spec.key)
