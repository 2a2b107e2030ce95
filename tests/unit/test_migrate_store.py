"""tools/migrate_store_v2.py on a small v1 store: new keys for renamed params, refs followed, one record per run,
every v1 bookkeeping file kept inside the record, metrics untouched, and a second pass changes nothing."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

from deftlab.experiments.runner import make_spec
from deftlab.store import RECORD_FORMAT, ResultsStore, run_key

REPO = Path(__file__).resolve().parents[2]


def _v1_run(root: Path, kind: str, key: str, params: dict, metrics: dict, files: dict, **extra) -> Path:
    d = root / kind / key
    d.mkdir(parents=True)
    manifest = {"created_at": "2026-11-23T05:03:42+00:00", "config": {"kind": kind, "params": params},
                "seed": 42, "git_commit": "abc1234", "packages": {"torch": "2"}, "hardware": {"cpu_count": 2}}
    rec = {"key": key, "kind": kind, "params": params, "metrics": metrics, "status": "ok", "experiment": "t1",
           "preset": "cpu-small", "labels": {"_row": "A"}, "duration_s": 3.0, "artifacts": [],
           "manifest": manifest, **extra}
    (d / "record.json").write_text(json.dumps(rec))
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "metrics.json").write_text(json.dumps(metrics))
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


def test_migration_rekeys_follows_refs_and_keeps_everything(tmp_path):
    root = tmp_path / "results"
    ft_params = {"model": "tiny", "task": "generated", "method": "dense", "adapter": "lora", "preset": "smoke"}
    old_cfg = {"config": {**ft_params, "keep": None, "lr": 0.003, "eval_sets": ["generated"], "device": "cpu"},
               "preset": {"name": "smoke", "eval_limit": 4, "seed": 0}}
    _v1_run(root, "finetune", "aaaaaaaaaaaa", ft_params, {"avg": 0.25, "acc_generated": 0.25},
            {"finetune_config.json": json.dumps(old_cfg), "eval/generated.metrics.json": "{}",
             "record.csv": "a,b\n1,2\n"}, fingerprint={"preset_config": "smoke:123"})
    osd_params = {"finetune": "@finetune/aaaaaaaaaaaa", "codec": "osd", "budget": 0.1, "preset": "smoke"}
    _v1_run(root, "osd", "bbbbbbbbbbbb", osd_params, {"rel_error": 0.5}, {"per_matrix.csv": "x\n"},
            refs={"finetune": "finetune/aaaaaaaaaaaa"})
    main = runpy.run_path(str(REPO / "tools" / "migrate_store_v2.py"))["main"]
    assert main([str(root)]) == 0

    store = ResultsStore(root)
    new_ft = {**{k: v for k, v in ft_params.items() if k != "preset"}, "profile": "smoke"}
    ft_key = run_key("finetune", new_ft, {"profile": "smoke:123"})
    (ft,) = store.records("finetune")
    assert ft["key"] == ft_key and ft["format"] == RECORD_FORMAT and ft["params"] == new_ft
    assert ft["metrics"] == {"avg": 0.25, "acc_generated": 0.25}  # as recorded, nothing recomputed
    assert ft["config"]["lr"] == 0.003 and ft["config"]["training_profile"]["eval_limit"] == 4
    assert ft["config"]["eval_sets"] == ["generated"] and ft["manifest"]["git_commit"] == "abc1234"
    assert ft["origin"]["experiment"] == "t1" and ft["migration"]["old_key"] == "aaaaaaaaaaaa"
    v1 = ft["migration"]["v1_files"]
    assert v1["finetune_config.json"] == old_cfg and v1["record.csv"] == "a,b\n1,2\n" and "manifest.json" in v1
    files = sorted(str(p.relative_to(store.run_dir("finetune", ft_key))) for p in
                   store.run_dir("finetune", ft_key).rglob("*") if p.is_file())
    assert files == ["eval/generated.metrics.json", "record.json"] and ft["artifacts"] == ["eval/generated.metrics.json"]

    (osd,) = store.records("osd")
    assert osd["params"]["finetune"] == f"@finetune/{ft_key}" and osd["refs"] == {"finetune": f"finetune/{ft_key}"}
    assert osd["params"]["profile"] == "smoke" and "preset" not in osd["params"]
    assert osd["key"] == run_key("osd", osd["params"]) and osd["artifacts"] == ["per_matrix.csv"]
    assert osd["config"]["eval_sets"] == ["generated"] and osd["config"]["training_profile"]["name"] == "smoke"
    # the key the registry computes today for the same run is the migrated one
    assert make_spec("finetune", new_ft).params == new_ft

    before = {p: p.read_bytes() for p in root.rglob("record.json")}
    assert main([str(root)]) == 0  # a v2 store is left as it is
    assert {p: p.read_bytes() for p in root.rglob("record.json")} == before
