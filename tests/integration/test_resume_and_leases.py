"""Runs that survive SIGKILL and share one store across hosts, exercised with real subprocesses.

- A smoke fine-tuning run killed after its first checkpoint resumes in place when run again and ends with the
  same metrics and trained tensors as an uninterrupted run with the same seed (tolerance: 1e-6 absolute on the
  losses and tensors, accuracies equal).
- Two processes presenting different host names (DEFTLAB_HOST) run one experiment on one store: every run is
  done exactly once and nothing is moved aside; a run whose owner is SIGKILLed is left alone while its lease is
  fresh and taken over (and resumed in its directory) once the heartbeat is older than DEFTLAB_LEASE_TIMEOUT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deftlab.store import ResultsStore

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path, **extra) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}
    env.pop("DEFTLAB_HOST", None)
    env.update(extra)
    return env


def _wait_for(pred, timeout=120.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        hit = pred()
        if hit:
            return hit
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


FINETUNE = ["finetune", "--model", "tiny", "--task", "generated", "--method", "dense", "--adapter", "lora",
            "--profile", "smoke", "--max-steps", "24", "--eval-limit", "2", "--device", "cpu", "--no-progress",
            "--wandb", "disabled", "--threads", "1"]


def test_sigkilled_finetune_resumes_from_its_checkpoint_with_the_same_result(tmp_path, tmp_cache):
    cmd = [sys.executable, "-m", "deftlab", *FINETUNE]
    env = _env(tmp_path, DEFTLAB_CACHE=str(tmp_cache))
    # the uninterrupted reference, in its own store
    ref = subprocess.run(cmd + ["--results", str(tmp_path / "ref")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    (ref_rec,) = ResultsStore(tmp_path / "ref").records("finetune")

    store = ResultsStore(tmp_path / "killed")
    partial = store.partial_dir("finetune", ref_rec["key"])
    proc = subprocess.Popen(cmd + ["--results", str(store.root)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = partial / "checkpoints" / "last.ckpt"
    try:
        # last.ckpt is renamed into place after the weights it names, so its presence is a complete checkpoint;
        # waiting for the weights file alone races the kill between the two writes (CI hit that: no resume)
        _wait_for(last.is_file, what="the first checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved_step = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    assert 0 < saved_step < 24 and partial.is_dir() and store.status("finetune", ref_rec["key"]).state == "interrupted"

    again = subprocess.run(cmd + ["--results", str(store.root)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    rec = store.load("finetune", ref_rec["key"])
    m, r = rec["metrics"], ref_rec["metrics"]
    assert rec["run"]["attempts"] == 2 and not store.aside_dirs("finetune", rec["key"])
    assert m["resumed_from_step"] == saved_step and m["train_steps"] == r["train_steps"] == 24
    assert m["train_loss_last"] == pytest.approx(r["train_loss_last"], abs=1e-6)
    assert m["acc_generated"] == r["acc_generated"] and m["params"] == r["params"]
    mine = load_file(str(store.run_dir("finetune", rec["key"]) / "trainable.safetensors"))
    theirs = load_file(str(ResultsStore(tmp_path / "ref").run_dir("finetune", rec["key"]) / "trainable.safetensors"))
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-6)


TOY = """
name: shared
title: runs shared by several hosts
source: {paper: none, item: test}
kind: toy
base: {sleep_s: %s}
grid: {seed: %s}
presets: {smoke: {}}
default_preset: smoke
"""


def _experiment(tmp_path, name, sleep_s, seeds) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "shared.yaml").write_text(TOY % (sleep_s, seeds))
    return d


def _runner(tmp_path, exps: Path, host: str, log: Path, timeout_s: float):
    env = _env(tmp_path, DEFTLAB_HOST=host, DEFTLAB_EXPERIMENTS=str(exps), DEFTLAB_TOY_LOG=str(log),
               DEFTLAB_POLL_S="0.1", DEFTLAB_LEASE_TIMEOUT=str(timeout_s))
    return subprocess.Popen([sys.executable, "-m", "deftlab", "run", "shared", "--results", str(tmp_path / "store"),
                             "--no-write"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_hosts_share_one_store_and_take_over_a_killed_owners_run(tmp_path):
    store = ResultsStore(tmp_path / "store")
    log = tmp_path / "toy.log"
    # 1. two live hosts, one experiment: each run exactly once, nothing moved aside
    exps = _experiment(tmp_path, "a", 0.4, "[0, 1, 2, 3, 4, 5]")
    procs = [_runner(tmp_path, exps, host, log, 30) for host in ("host-a", "host-b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    lines = log.read_text().split()
    runs = [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 3)]
    assert sorted(seed for _, seed in runs) == [0, 1, 2, 3, 4, 5]  # each run once, whoever ran it
    recs = list(store.records("toy"))
    assert len(recs) == 6 and {r["run"]["host"] for r in recs} <= {"host-a", "host-b"}
    assert all(r["run"]["attempts"] == 1 for r in recs)
    assert not [p for p in (store.root / "toy").iterdir() if p.name.startswith(".")]  # nothing aside or left over

    # 2. host-c's run is killed mid-way; host-d waits while the lease is fresh, then takes the run over
    log.unlink()
    exps = _experiment(tmp_path, "b", 600, "[7]")
    owner = _runner(tmp_path, exps, "host-c", log, 3)
    try:
        partial = _wait_for(lambda: next((p for p in (store.root / "toy").glob(".*.partial")
                                          if (p / "started.txt").is_file()), None), what="host-c's run to start")
        taker = _runner(tmp_path, exps, "host-d", log, 3)
        time.sleep(2.5)  # host-c is alive and renewing its lease: host-d must leave the run alone
        assert taker.poll() is None and partial.is_dir() and not log.exists()
        lease = json.loads((partial / ".lease.json").read_text())
        assert lease["host"] == "host-c" and time.time() - lease["heartbeat"] < 3
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=60)
    out, err = taker.communicate(timeout=120)
    assert taker.returncode == 0, err[-2000:]
    (rec,) = [r for r in store.records("toy") if r["params"]["seed"] == 7]
    assert rec["run"]["host"] == "host-d" and rec["run"]["attempts"] == 2
    assert rec["metrics"]["resumed"] is True  # it continued in host-c's directory (started.txt was there)
    assert log.read_text().split() == ["host-d", "7", "True"] and not partial.exists()
    assert not store.aside_dirs("toy", rec["key"])
