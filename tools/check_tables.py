"""Rebuild committed tables from a results store and compare their numbers with the committed CSVs.

    python tools/check_tables.py [--results DIR] [--tables paper_figures/tables] [--preset cpu-small]

For every <experiment>-<preset>.csv under --tables, the table is rebuilt from the store (as `deftlab run
<experiment> --only-table` does) and its cells (row, column, ours, std, n_runs, paper) are compared with the
committed ones; exit code 1 when any number differs. Used after tools/migrate_store_v2.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from deftlab.experiments.registry import load_experiment
from deftlab.experiments.tables import build_table
from deftlab.store import ResultsStore

COMPARED = ("row", "column", "ours", "std", "n_runs", "n_expected", "paper")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b or (pd.isna(a) and pd.isna(b))


def compare(name: str, preset: str, committed: Path, store: ResultsStore) -> list[str]:
    old = pd.read_csv(committed)
    new = pd.read_csv(__import__("io").StringIO(build_table(load_experiment(name), preset, store)
                                                 .frame().to_csv(index=False)))
    problems = []
    if len(old) != len(new):
        return [f"{len(old)} cells committed, {len(new)} rebuilt"]
    for i, (o, n) in enumerate(zip(old.to_dict("records"), new.to_dict("records"))):
        for col in COMPARED:
            if col in o and not _same(o[col], n.get(col)):
                problems.append(f"cell {i} ({o['row']} / {o['column']}) {col}: committed {o[col]!r}, "
                                f"rebuilt {n.get(col)!r}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=None)
    ap.add_argument("--tables", default="paper_figures/tables")
    ap.add_argument("--preset", default="cpu-small")
    args = ap.parse_args(argv)
    store = ResultsStore(args.results)
    bad = 0
    for csv in sorted(Path(args.tables).glob(f"*-{args.preset}.csv")):
        name = csv.name.removesuffix(f"-{args.preset}.csv")
        problems = compare(name, args.preset, csv, store)
        cells = len(pd.read_csv(csv))
        print(f"{name:16s} {'identical' if not problems else 'DIFFERS'} ({cells} cells)")
        for p in problems[:10]:
            print(f"    {p}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
