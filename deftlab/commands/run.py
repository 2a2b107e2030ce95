"""deftlab run: run a registered paper experiment (only the missing runs), then print its paper-vs-ours table."""

from __future__ import annotations

import sys

from deftlab.errors import DeftlabError
from deftlab.experiments.registry import load_all, load_experiment
from deftlab.experiments.runner import format_plan, plan, run_experiment
from deftlab.experiments.tables import build_table
from deftlab.store import ResultsStore


def add_parser(sub, name):
    p = sub.add_parser(
        name, help="run a paper table/figure experiment (resumable) and print its table",
        description="Run the runs of EXPERIMENT that the results store lacks, then print and write its table "
                    "(paper_figures/tables/<experiment>-<preset>.{md,tex,csv}). Re-running resumes.")
    p.add_argument("experiment", nargs="?", help="experiment name (see --list)")
    p.add_argument("--preset", default=None,
                   help="smoke | cpu-small | gpu | paper (default: the experiment's, normally cpu-small)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--dry-run", action="store_true", help="list the runs (done/missing) and the estimated cost")
    p.add_argument("--force", action="store_true", help="re-run recorded runs too (old results are kept aside)")
    p.add_argument("--results", default=None, help="results store (default: $DEFTLAB_RESULTS or ./results)")
    p.add_argument("--only-table", action="store_true", help="run nothing; build the table from recorded runs")
    p.add_argument("--keep-going", action="store_true", help="continue after a failed run")
    p.add_argument("--tables-dir", default=None, help="where to write the table files "
                   "(default: paper_figures/tables)")
    p.add_argument("--no-write", action="store_true", help="print the table without writing files")
    return p


def _list(store) -> int:
    exps = load_all()
    if not exps:
        raise DeftlabError("no experiments found", "set DEFTLAB_EXPERIMENTS or run from a deftlab checkout")
    width = max(len(n) for n in exps)
    for name, exp in exps.items():
        items = plan(exp, exp.default_preset, store)
        done = sum(it.state == "done" for it in items)
        print(f"{name:{width}s}  {exp.kind:10s} {done:3d}/{len(items):<3d} done [{exp.default_preset}]  "
              f"{exp.source.item}: {exp.title}")
    return 0


def run(args) -> int:
    store = ResultsStore(args.results)
    if args.list:
        return _list(store)
    if not args.experiment:
        raise DeftlabError("no experiment named", "give one, e.g. `deftlab run table1`, or list them with --list")
    exp = load_experiment(args.experiment)
    preset = args.preset or exp.default_preset
    exp.preset(preset)  # unknown preset -> UnknownNameError listing the known ones
    if args.dry_run:
        print(format_plan(exp, preset, plan(exp, preset, store), store))
        return 0
    failed = 0
    if not args.only_table:
        def say(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        try:
            report = run_experiment(exp, preset, store, force=args.force, keep_going=args.keep_going,
                                    progress=say)
        except DeftlabError:  # print what is recorded so far, then the one-line error
            if exp.table is not None:
                _table(exp, preset, store, args, build_table)
            raise
        failed = len(report.failed)
        say(f"{exp.name} [{preset}]: {len(report.ran)} ran, {len(report.skipped)} already recorded, "
            f"{failed} failed")
    if exp.table is not None:
        _table(exp, preset, store, args, build_table)
    return 1 if failed else 0


def _table(exp, preset, store, args, build_table) -> None:
    result = build_table(exp, preset, store)
    print(result.markdown())
    if not args.no_write:
        paths = result.write(args.tables_dir)
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
