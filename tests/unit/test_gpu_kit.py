"""The GPU kit's --dry-run (CPU, tiny shapes), so the kit keeps working between GPU loans."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_kit_dry_run_records_measured_and_planned_memory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEFTLAB_RESULTS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results" / "efficiency").glob("*/record.json")]
    assert len(records) == 4
    for rec in records:
        m = rec["metrics"]
        assert m["weights"] == "synthetic" and m["peak_mem_mb"] > 0 and m["predicted_mem_mb"] > 0
        assert rec["manifest"]["git_commit"]  # a record like any other run's
    table = (tmp_path / "gpu-check-smoke.md").read_text()
    assert "Planned (GB)" in table and "missing" not in table.split("| --- |")[-1]
    assert "fine-tuning (gradient checkpointing)" in (tmp_path / "plan-llama-65b.txt").read_text()
