"""deftlab show KEY: one record of the results store: what ran (params, resolved config), what it measured,
where and from which commit, and its artifacts. Tables print each row's key in their `run` column."""

from __future__ import annotations

import json
from deftlab.store import ResultsStore


def add_parser(sub, name):
    p = sub.add_parser(name, help="print a recorded run: config, metrics, commit, artifacts",
                       description="Print the record of run KEY (a key or its first digits; kind/key also works): "
                                   "params, resolved config, metrics, git commit, packages, host and artifacts.")
    p.add_argument("key", help="run key, e.g. 4446c92c6ee8 (from a table's run column), or a unique prefix")
    p.add_argument("--results", default=None, help="results store (default: $DEFTLAB_RESULTS or ./results)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    return p


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) if all(not isinstance(x, (dict, list)) for x in v) else json.dumps(v)
    return str(v)


def format_record(rec: dict, path: str) -> str:
    man, run, origin = rec.get("manifest", {}), rec.get("run", {}), rec.get("origin", {})
    lines = [f"run {rec['kind']}/{rec['key']}   {path}",
             f"commit   {man.get('git_commit')}   created {man.get('created_at')}   seed {man.get('seed')}",
             (f"ran on   {run.get('host')} (pid {run.get('pid')}), " if run.get("host") else
              "ran on   host not recorded, ")
             + f"started {run.get('started_at')}, finished {run.get('finished_at') or 'not recorded'}, "
             f"{run.get('duration_s')} s, attempt {run.get('attempts')}",
             f"origin   {', '.join(f'{k}={v}' for k, v in origin.items() if v not in (None, {}, ''))}"]
    if rec.get("migration"):
        lines.append(f"migrated from the v1 store (old key {rec['migration'].get('old_key')}; its bookkeeping files "
                     "are kept under migration.v1_files, see --json)")
    if rec.get("refs"):
        lines.append("depends  " + ", ".join(f"{k}={v}" for k, v in rec["refs"].items()))
    if rec.get("fingerprint"):
        lines.append("fingerprint " + ", ".join(f"{k}={v}" for k, v in rec["fingerprint"].items()))
    for title, data in (("params", rec.get("params") or {}), ("config", rec.get("config") or {}),
                        ("metrics", rec.get("metrics") or {})):
        rows = list(_flat(data))
        lines.append(f"\n{title} ({len(rows)})")
        width = max((len(k) for k, _ in rows), default=0)
        lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in rows]
    pk = man.get("packages") or {}
    lines.append("\npackages " + ", ".join(f"{k} {v}" for k, v in pk.items() if v))
    hw = man.get("hardware") or {}
    lines.append("hardware " + ", ".join(f"{k}={v}" for k, v in hw.items()))
    arts = rec.get("artifacts") or []
    lines.append(f"\nartifacts ({len(arts)})")
    lines += [f"  {a}" for a in arts[:40]]
    if len(arts) > 40:
        lines.append(f"  ... {len(arts) - 40} more")
    return "\n".join(lines)


def run(args) -> int:
    store = ResultsStore(args.results)
    rec = store.find(args.key)
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        print(format_record(rec, str(store.run_dir(rec["kind"], rec["key"]))))
    return 0
