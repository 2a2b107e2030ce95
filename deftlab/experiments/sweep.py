"""Hyper-parameter sweeps: a W&B sweep config, run by a W&B agent when online, by a local grid otherwise.

A sweep file (configs/sweeps/<name>.yaml) is a W&B sweep config plus one `deftlab:` section saying which
experiment (and preset) supplies the base params:

    method: grid
    metric: {name: avg, goal: maximize}
    parameters:
      eta: {values: [0.0, 0.1, 0.5, 1.0]}
    deftlab: {experiment: table5, preset: cpu-small}

Each trial's params are the experiment's base params under the preset (its grid and explicit runs are not used)
with the trial's values merged on top. Every trial goes through the same runner and results store as
`deftlab run`, so a trial already recorded (same kind + params) is not recomputed, whichever way it ran.
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deftlab.config import ConfigError, load_yaml
from deftlab.errors import DeftlabError, UnknownNameError
from deftlab.experiments.registry import deep_merge, load_experiment
from deftlab.experiments.runner import RunSpec, execute_waiting, make_spec
from deftlab.experiments.tables import metric_value
from deftlab.paths import configs_dir
from deftlab.store import ResultsStore

SWEEP_METHODS = ("grid", "random", "bayes")


@dataclass
class Sweep:
    name: str
    path: Path
    wandb_config: dict  # the config without the deftlab section, as wandb.sweep takes it
    experiment: str | None
    preset: str | None
    kind: str
    base: dict
    project: str = "deftlab"
    trials: list[dict] = field(default_factory=list)  # the local grid


def sweeps_dir() -> Path:
    return configs_dir() / "sweeps"


def sweep_names() -> list[str]:
    d = sweeps_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _find(config: str) -> Path:
    p = Path(config)
    if p.is_file():
        return p
    cand = sweeps_dir() / f"{config}.yaml"
    if cand.is_file():
        return cand
    raise UnknownNameError("sweep config", config, sweep_names())


def grid_trials(parameters: dict, where: str = "parameters") -> list[dict]:
    """The cartesian product of a W&B `parameters` block (value / values / nested parameters)."""
    axes: list[tuple[str, list[Any]]] = []
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping such as {{values: [...]}}")
        if "value" in spec:
            axes.append((name, [spec["value"]]))
        elif "values" in spec:
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise ConfigError(f"{where}.{name}.values must be a non-empty list")
            axes.append((name, list(spec["values"])))
        elif "parameters" in spec:
            axes.append((name, grid_trials(spec["parameters"], f"{where}.{name}.parameters")))
        else:
            raise ConfigError(f"{where}.{name}: a distribution ({sorted(spec)}) cannot be run as a local grid",
                              "give explicit 'values' (or run the sweep online with W&B)")
    return [dict(zip((a for a, _ in axes), combo)) for combo in itertools.product(*(v for _, v in axes))]


def load_sweep(config: str, preset: str | None = None) -> Sweep:
    path = _find(config)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    dl = data.get("deftlab") or {}
    if not isinstance(dl, dict):
        raise ConfigError(f"{path}: 'deftlab' must be a mapping")
    unknown = set(dl) - {"experiment", "preset", "kind", "base", "project"}
    if unknown:
        raise ConfigError(f"{path}: unknown deftlab key(s) {sorted(unknown)}",
                          "valid keys: experiment, preset, kind, base, project")
    method = data.get("method", "grid")
    if method not in SWEEP_METHODS:
        raise ConfigError(f"{path}: method '{method}' is not one of {list(SWEEP_METHODS)}")
    params = data.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: 'parameters' must be a non-empty mapping", "see configs/sweeps/*.yaml")
    exp_name = dl.get("experiment")
    preset = preset or dl.get("preset")
    base: dict = {}
    kind = dl.get("kind")
    if exp_name:
        exp = load_experiment(exp_name)
        preset = preset or exp.default_preset
        base = deep_merge(exp.base, exp.preset(preset).base)
        kind = kind or exp.kind
    if not kind:
        raise ConfigError(f"{path}: name an experiment or a kind in the deftlab section")
    base = deep_merge(base, dl.get("base") or {})
    wb = {k: copy.deepcopy(v) for k, v in data.items() if k != "deftlab"}
    return Sweep(path.stem, path, wb, exp_name, preset, kind, base, dl.get("project", "deftlab"),
                 grid_trials(params))


def trial_spec(sweep: Sweep, values: dict) -> RunSpec:
    params = deep_merge(sweep.base, values)
    return make_spec(sweep.kind, params, experiment=f"sweep:{sweep.name}", preset=sweep.preset,
                     where=f"sweep {sweep.name}")


def wandb_online() -> bool:
    """True only when W&B is explicitly online and an API key is configured."""
    if os.environ.get("WANDB_MODE", "").lower() != "online":
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(getattr(getattr(wandb, "api", None), "api_key", None))
    except Exception:  # wandb missing or unconfigured: treat as offline
        return False


def run_local(sweep: Sweep, store: ResultsStore, *, keep_going: bool = True, limit: int | None = None,
              progress: Callable[[str], None] | None = None) -> list[tuple[RunSpec, dict | None]]:
    """Run the sweep's grid locally (skipping recorded trials); returns each trial with its record."""
    say = progress or (lambda _m: None)
    out: list[tuple[RunSpec, dict | None]] = []
    trials = sweep.trials[:limit] if limit else sweep.trials
    for i, values in enumerate(trials, 1):
        spec = trial_spec(sweep, values)
        state = store.status(spec.kind, spec.key).state
        say(f"[{i}/{len(trials)}] {spec.ref} {values} ({'recorded' if state == 'done' else 'running'})")
        try:
            out.append((spec, execute_waiting(spec, store, progress=say)))
        except DeftlabError as e:  # a failed trial, or a kind that cannot run here
            say(f"  failed: {e}")
            out.append((spec, None))
            if not keep_going:
                raise
    return out


def run_wandb(sweep: Sweep, store: ResultsStore, *, count: int | None = None, sweep_id: str | None = None,
              progress: Callable[[str], None] | None = None) -> str:
    """Register the sweep with W&B (or join `sweep_id`) and run an agent; trials write to the same store."""
    import wandb

    say = progress or (lambda _m: None)
    if sweep_id is None:
        sweep_id = wandb.sweep(sweep=copy.deepcopy(sweep.wandb_config), project=sweep.project)
    say(f"W&B sweep {sweep_id} (project {sweep.project})")

    def trial() -> None:
        run = wandb.init()
        try:
            values = dict(run.config)
            spec = trial_spec(sweep, values)
            record = execute_waiting(spec, store, progress=say)
            metrics = {k: v for k, v in record["metrics"].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            run.summary.update({"deftlab_run": spec.ref, **metrics})
            wandb.log(metrics)
        finally:
            run.finish()

    wandb.agent(sweep_id, function=trial, count=count, project=sweep.project)
    return sweep_id


def best_trial(results: list[tuple[RunSpec, dict | None]], metric: str, goal: str = "maximize"):
    """The recorded trial with the best value of `metric` (None if none has it)."""
    scored = [(metric_value(rec["metrics"], metric), spec, rec) for spec, rec in results if rec]
    scored = [s for s in scored if s[0] is not None]
    if not scored:
        return None
    pick = max if goal == "maximize" else min
    return pick(scored, key=lambda s: s[0])


def describe(sweep: Sweep) -> str:
    m = sweep.wandb_config.get("metric", {})
    return (f"sweep {sweep.name}: kind {sweep.kind}, experiment {sweep.experiment or '-'} [{sweep.preset or '-'}], "
            f"{len(sweep.trials)} grid trials, metric {m.get('name', '-')} ({m.get('goal', '-')})")

