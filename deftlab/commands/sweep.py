"""deftlab sweep: a W&B sweep (agent) when W&B is online, else the same grid run locally; one results store."""

from __future__ import annotations

import sys
from deftlab.errors import DeftlabError
from deftlab.store import ResultsStore


def add_parser(sub, name):
    p = sub.add_parser(
        name, help="run a hyper-parameter sweep (W&B agent when online, local grid otherwise)",
        description="Run CONFIG (a path or a name in configs/sweeps/). With WANDB_MODE=online and an API key "
                    "configured, registers a W&B sweep and runs an agent; otherwise runs the grid locally. "
                    "Both record every trial in the results store, skipping trials already recorded.")
    p.add_argument("config", nargs="?", help="sweep config path or name (see --list)")
    p.add_argument("--list", action="store_true", help="list the sweep configs and exit")
    p.add_argument("--preset", default=None, help="preset of the base experiment (default: the config's)")
    p.add_argument("--results", default=None, help="results store (default: $DEFTLAB_RESULTS or ./results)")
    p.add_argument("--offline", action="store_true", help="run the local grid even when W&B is online")
    p.add_argument("--count", type=int, default=None, help="at most this many trials")
    p.add_argument("--sweep-id", default=None, help="join an existing W&B sweep instead of creating one")
    p.add_argument("--dry-run", action="store_true", help="list the local grid's trials and their state")
    return p


def run(args) -> int:
    from deftlab.experiments.sweep import (best_trial, describe, load_sweep, run_local, run_wandb, sweep_names,
                                           trial_spec, wandb_online)

    if args.list:
        for n in sweep_names():
            print(describe(load_sweep(n)))
        return 0
    if not args.config:
        raise DeftlabError("no sweep config named", "give one, e.g. `deftlab sweep eta`, or list them with --list")
    sweep = load_sweep(args.config, args.preset)
    store = ResultsStore(args.results)
    print(describe(sweep), file=sys.stderr)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.dry_run:
        for values in sweep.trials:
            spec = trial_spec(sweep, values)
            print(f"  {store.status(spec.kind, spec.key).state:8s} {spec.ref:24s} {values}")
        return 0
    if wandb_online() and not args.offline:
        run_wandb(sweep, store, count=args.count, sweep_id=args.sweep_id, progress=say)
        return 0
    say("W&B is not online (needs WANDB_MODE=online and an API key): running the grid locally")
    results = run_local(sweep, store, limit=args.count, progress=say)
    metric = sweep.wandb_config.get("metric") or {}
    for spec, rec in results:
        m = rec["metrics"] if rec else {}
        shown = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(f"{spec.ref}  {spec.describe(60)}  " + ("FAILED" if rec is None else
              " ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:6])))
    if metric.get("name"):
        best = best_trial(results, metric["name"], metric.get("goal", "maximize"))
        if best:
            print(f"best {metric['name']} = {best[0]:.4g}: {best[1].ref} {best[1].describe(60)}")
    return 1 if any(rec is None for _, rec in results) else 0
