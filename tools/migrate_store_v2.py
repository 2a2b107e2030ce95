"""One-time migration of a results store to the v2 layout: one record.json per run, nothing else beside it.

    python tools/migrate_store_v2.py [RESULTS_DIR] [--dry-run]

What changes (nothing is recomputed; every number is carried over as recorded):
- the training-profile param `preset` of finetune / osd / efficiency runs is now `profile` (its fingerprint
  `preset_config` is now `profile`), so their keys are recomputed, and an osd run's `@finetune/<key>` reference
  follows its fine-tuning run's new key;
- each run's bookkeeping files (manifest.json, run.record.json, record.csv, metrics.json, finetune_config.json,
  command.json) are folded into the one record: the manifest and the resolved config become its `manifest` and
  `config`, and the files' full content is kept under `migration.v1_files`, so nothing is lost;
- osd records get the resolved config the osd kind records now (its evaluation profile and sets, read from
  the fine-tuning run's record), filled into v2 records that lack it too;
- results/decompose/<name>/ (the old `deftlab decompose` output) becomes a compress record with the params that
  command ran with (its dense "before" perplexities are kept as ppl_before_<corpus>).

Run it once per store; a store already in v2 is left as it is. Then `deftlab run <experiment> --only-table`
rebuilds every table from the migrated records (tools/check_tables.py compares them with the committed ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deftlab.config import flat_fields, to_dict
from deftlab.manifest import write_json_atomic
from deftlab.recipes.compress import resolved_config as compress_config
from deftlab.recipes.finetune import FinetuneConfig
from deftlab.recipes.osd import resolved_config as osd_config
from deftlab.store import RECORD, RECORD_FORMAT, run_key
from deftlab.store.store import artifact_list
from deftlab.train.profiles import profile_fingerprint

BOOKKEEPING = ("manifest.json", "run.record.json", "record.csv", "metrics.json", "finetune_config.json",
               "command.json", ".owner.json", "run.manifest.json")
RENAMED_KINDS = ("finetune", "osd", "efficiency")
ORDER = ("compress", "finetune", "efficiency", "osd")  # a ref's target before the runs that name it


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def new_params(kind: str, params: dict, key_map: dict) -> dict:
    out = dict(params)
    if kind in RENAMED_KINDS and "preset" in out:
        out["profile"] = out.pop("preset")
    for name, value in out.items():
        if isinstance(value, str) and value.startswith("@"):
            out[name] = "@" + key_map.get(value[1:], value[1:])
    return out


def new_fingerprint(old: dict, params: dict) -> dict:
    fp = dict(old or {})
    if "preset_config" in fp:
        fp["profile"] = fp.pop("preset_config")
        now = profile_fingerprint(params)
        if now and now["profile"] != fp["profile"]:
            print(f"  warning: profile file changed since the run ({fp['profile']} -> {now['profile']}); "
                  "the run keeps the fingerprint it was made with", file=sys.stderr)
    return fp


def finetune_config(old_cfg: dict | None) -> dict | None:
    """The v2 (nested) resolved config from finetune_config.json's flat resolved config + training preset."""
    if not old_cfg:
        return None
    flat = {k: v for k, v in dict(old_cfg.get("config") or {}).items() if v is not None}
    if "preset" in flat:
        flat["profile"] = flat.pop("preset")
    known = flat_fields(FinetuneConfig)
    flat = {k: v for k, v in flat.items() if k in known}
    cfg = to_dict(FinetuneConfig.from_params(flat))
    return {**cfg, "training_profile": old_cfg.get("preset")}


def v2_record(kind: str, key: str, old: dict, params: dict, fp: dict, refs: dict, v1_files: dict) -> dict:
    man = dict(old.get("manifest") or v1_files.get("manifest.json") or {})
    if kind == "finetune":
        config = finetune_config(v1_files.get("finetune_config.json"))
    elif kind == "compress":
        config = compress_config(params)
    else:
        config = None
    return {
        "format": RECORD_FORMAT, "key": key, "kind": kind, "status": old.get("status", "ok"),
        "params": params, "fingerprint": fp, "refs": refs, "config": config, "metrics": old["metrics"],
        "artifacts": [],  # filled once the bookkeeping files are gone
        "origin": {"experiment": old.get("experiment"), "preset": old.get("preset"),
                   "labels": old.get("labels") or {}, "command": None},
        "run": {"host": None, "pid": None, "started_at": old.get("started_at") or man.get("created_at"),
                "finished_at": None, "duration_s": old.get("duration_s"), "attempts": 1},
        "manifest": {k: man.get(k) for k in ("created_at", "git_commit", "packages", "hardware", "seed")},
        "migration": {"from": "deftlab store v1", "old_key": old.get("key"), "config_source":
                      {"finetune": "finetune_config.json", "compress": "resolved from params at migration"}.get(kind),
                      "v1_record": {k: v for k, v in old.items() if k not in ("metrics", "manifest", "params")},
                      "v1_files": v1_files},
    }


def migrate_run(root: Path, kind: str, run_dir: Path, key_map: dict, dry: bool) -> str | None:
    old = _read(run_dir / RECORD)
    if not isinstance(old, dict) or old.get("format") == RECORD_FORMAT:
        return None
    params = new_params(kind, old.get("params") or {}, key_map)
    fp = new_fingerprint(old.get("fingerprint") or {}, params)
    key = run_key(kind, params, fp)
    refs = {n: key_map.get(r, r) for n, r in (old.get("refs") or {}).items()}
    key_map[f"{kind}/{run_dir.name}"] = f"{kind}/{key}"
    v1_files = {n: _read(run_dir / n) if n.endswith(".json") else (run_dir / n).read_text()
                for n in BOOKKEEPING if (run_dir / n).is_file()}
    rec = v2_record(kind, key, old, params, fp, refs, v1_files)
    target = root / kind / key
    print(f"  {kind}/{run_dir.name} -> {kind}/{key}")
    if dry:
        return key
    if target != run_dir and target.exists():
        raise SystemExit(f"error: {target} exists already; migrate into a clean store copy")
    write_json_atomic(run_dir / ".record.v2.json", rec)  # written in full before anything is removed
    for n in BOOKKEEPING:
        (run_dir / n).unlink(missing_ok=True)
    rec["artifacts"] = artifact_list(run_dir)
    write_json_atomic(run_dir / RECORD, rec)
    (run_dir / ".record.v2.json").unlink()
    if target != run_dir:
        os.replace(run_dir, target)
    return key


def migrate_decompose(root: Path, d: Path, dry: bool) -> None:
    s = _read(d / "summary.json")
    if not isinstance(s, dict):
        return
    calib = d.name.rpartition("-")[2].removesuffix("256") or "arith"
    # what the old `deftlab decompose` ran with (all its flags had explicit defaults)
    params = {"model": s["model"], "allocator": s["allocator"], "svd": s["svd"], "eta": s["eta"], "calib": calib,
              "calib_n": 256, "calib_seed": 42, "group": 32, "ppl": list(s["ppl_after"]),
              "ppl_max_tokens": s["ppl_max_tokens"], "ppl_seqlen": 2048}
    params.update({k: v for k, v in s["target"].items() if v is not None})
    key = run_key("compress", params)
    metrics = {"params_total": s["model_params_after"], "params_dense_total": s["model_params_before"],
               "keep_fraction": s["keep_fraction"], "err": s["err"], "params_decoder_kept": s["decoder_params_after"],
               "params_decoder_dense": s["decoder_params_before"],
               **{f"ppl_{c}": v for c, v in s["ppl_after"].items()},
               **{f"ppl_before_{c}": v for c, v in s["ppl_before"].items()}}
    old = {"metrics": metrics, "status": "ok", "key": None, "experiment": None, "preset": None}
    rec = v2_record("compress", key, old, params, {}, {}, {"summary.json": s})
    rec["origin"]["command"] = "deftlab decompose (before the v2 store)"
    print(f"  decompose/{d.name} -> compress/{key}")
    if dry:
        return
    target = root / "compress" / key
    if target.exists():
        raise SystemExit(f"error: {target} exists already")
    (d / "summary.json").unlink()
    rec["artifacts"] = artifact_list(d)
    write_json_atomic(d / RECORD, rec)
    os.replace(d, target)


def fill_osd_configs(root: Path, dry: bool) -> None:
    """The osd kind's resolved config for osd records without one (computed from the fine-tuning record)."""
    for d in sorted((root / "osd").glob("[!.]*")) if (root / "osd").is_dir() else []:
        rec = _read(d / RECORD)
        if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT or rec.get("config") is not None:
            continue
        call = dict(rec["params"])
        for name, value in call.items():  # a dependency as the runner passes it
            if isinstance(value, str) and value.startswith("@"):
                kind, _, key = value[1:].partition("/")
                call[name] = {"ref": value[1:], "dir": str((root / kind / key).resolve())}
        print(f"  osd/{d.name}: resolved config filled in")
        if not dry:
            rec["config"] = osd_config(call)
            rec.setdefault("migration", {})["config_source"] = "resolved from params and the finetune record"
            write_json_atomic(d / RECORD, rec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="results")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.root)
    key_map: dict[str, str] = {}
    kinds = [k for k in ORDER if (root / k).is_dir()] + sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name not in ORDER and p.name != "decompose")
    for kind in kinds:
        print(kind)
        for d in sorted((root / kind).iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                migrate_run(root, kind, d, key_map, args.dry_run)
    if (root / "decompose").is_dir():
        print("decompose")
        for d in sorted((root / "decompose").iterdir()):
            if d.is_dir():
                migrate_decompose(root, d, args.dry_run)
        if not args.dry_run and not any((root / "decompose").iterdir()):
            (root / "decompose").rmdir()
    fill_osd_configs(root, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
