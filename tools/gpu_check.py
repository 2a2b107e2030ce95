"""The GPU kit (`make gpu-check`): one prepared script for a borrowed GPU with no network, ≤ 8 minutes on one H200.

1. Installs the carried wheels (`--wheels DIR`, default ./wheels: bitsandbytes and whatever else the machine
   lacks) into a temporary site, put first on the path of this process and of every process it starts.
2. Runs the CUDA-marked tests (`pytest -m cuda`: bf16, NF4 factors on CUDA, PEFT's LoftQ, torch.cuda memory
   accounting).
3. Measures QLoRA vs QLoRA + DeFT 55 % at LLaMA-7B and LLaMA-65B shapes with synthetic weights built block by
   block straight into NF4 (experiment `gpu-check`, preset gpu: batch 1 and 2, a few steps), each run with
   `deftlab plan`'s prediction beside it, recorded through the results store under OUT/results.
4. Writes OUT/gpu-check-<preset>.md (the table, with the paper's Table 4 memory for the 65B rows) and
   OUT/plan-llama-65b.txt, and prints the time each step took.

    python tools/gpu_check.py --out "$OUT"            # on the GPU machine (what `make gpu-check` runs)
    python tools/gpu_check.py --dry-run --out /tmp/k  # CPU, tiny shapes: the default test suite runs this

Bring OUT/results back, copy its run directories into results/ and commit them with the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _step(name: str, t0: float) -> float:
    now = time.time()
    print(f"[gpu-check] {name}: {now - t0:.1f} s", flush=True)
    return now


def install_wheels(wheels: Path, env: dict) -> str | None:
    """pip-install every wheel in `wheels` (no index, no dependencies) into a temporary site; returns its path."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        print(f"[gpu-check] no wheels in {wheels}: using what is installed")
        return None
    site = tempfile.mkdtemp(prefix="deftlab-site-")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", site,
                    *map(str, found)], check=True, env=env)
    return site


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="output folder (default $OUT)")
    ap.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of carried wheels (default ./wheels)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no wheels: checks the kit itself")
    ap.add_argument("--preset", default=None, help="gpu-check preset (default: gpu, or smoke with --dry-run)")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds for the measurements (default 420)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    preset = args.preset or ("smoke" if args.dry_run else "gpu")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("WANDB_MODE", "offline")
    env["DEFTLAB_RESULTS"] = str(out / "results")
    t0 = time.time()
    if not args.dry_run:
        site = install_wheels(Path(args.wheels), env)
        if site:
            env["PYTHONPATH"] = os.pathsep.join((site, env["PYTHONPATH"]))
        t0 = _step("wheels", t0)
        import torch

        if not torch.cuda.is_available():
            print("[gpu-check] no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
            return 2
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "unit" / "test_cuda.py")], env=env, cwd=ROOT)
    t0 = _step(f"cuda tests (exit {tests.returncode})", t0)
    try:
        run = subprocess.run([sys.executable, "-m", "deftlab", "run", "gpu-check", "--preset", preset, "--keep-going",
                              "--no-write"], env=env, cwd=ROOT, timeout=args.timeout)
        measured = run.returncode
    except subprocess.TimeoutExpired:
        measured = "timeout"
    t0 = _step(f"measurements (exit {measured})", t0)
    sys.path.insert(0, str(ROOT))
    from deftlab.experiments.registry import load_experiment
    from deftlab.experiments.tables import build_table
    from deftlab.store import ResultsStore

    table = build_table(load_experiment("gpu-check"), preset, ResultsStore(out / "results"))
    (out / f"gpu-check-{preset}.md").write_text(table.markdown())
    print(table.markdown())
    plan = subprocess.run([sys.executable, "-m", "deftlab", "plan", "llama-65b", "--keep", "0.55", "--device-mem",
                           "24GB"], env=env, cwd=ROOT, capture_output=True, text=True)
    (out / "plan-llama-65b.txt").write_text(plan.stdout + plan.stderr)
    _step("table and plan", t0)
    ok = tests.returncode in (0, 5) and measured == 0 and table.missing == 0  # 5: no CUDA test collected
    print(f"[gpu-check] {'done' if ok else 'INCOMPLETE'}: {table.expected - table.missing}/{table.expected} runs "
          f"recorded in {out / 'results'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
