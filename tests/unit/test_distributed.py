"""Multi-process training on CPU (gloo): ranks, strategies, torchrun launches that record once, FSDP.

The torchrun test launches tests/unit/_torchrun_job.py in 2 processes. Tolerances: the 2-process runs make the
same optimizer steps as 1 process accumulating the same global batch, so loss curves agree to 1e-5 relative and
trained weights to 1e-5 relative (1e-7 absolute): float rounding of the gradient all-reduce / reduce-scatter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deftlab.config import ConfigError
from deftlab.errors import DeftlabError
from deftlab.experiments.kinds import unregister_kind
from deftlab.experiments.runner import execute, make_spec
from deftlab.models.tiny import tiny_llama
from deftlab.store import ResultsStore
from deftlab.train import distributed
from deftlab.train.profiles import load_profile
from deftlab.train.trainer import FINAL_WEIGHTS

sys.path.insert(0, str(Path(__file__).parent))
import _torchrun_job as job  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ENV = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID")
RTOL, ATOL = 1e-5, 1e-7

DDP_LORA = {"profile": {"max_steps": 3, "devices": 2}, "trainable": ["q_proj", "v_proj"]}  # strategy auto
FSDP_FULL = {"profile": {"max_steps": 3, "devices": 2, "strategy": "fsdp"}, "trainable": [""]}


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables in, none left behind (Lightning's launcher sets some in this process)."""
    for v in LAUNCH_ENV:
        monkeypatch.delenv(v, raising=False)
    yield monkeypatch
    if torch.distributed.is_initialized():  # an in-process 1-device ddp/fsdp run leaves its process group
        torch.distributed.destroy_process_group()


def one_process(params: dict) -> dict:
    """The same global batch on 1 process (accumulating what 2 processes share per step)."""
    p = json.loads(json.dumps(params))
    p["profile"].update(devices=1, strategy="auto")
    return p


# --- ranks and strategies ---------------------------------------------------------------------------------------
def test_rank_comes_from_the_launcher(clean_env):
    assert distributed.global_rank() == 0 and distributed.is_global_zero()
    assert not distributed.launched_externally() and distributed.launched_world_size() is None
    for k, v in {"RANK": "1", "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    assert distributed.launched_externally() and distributed.launched_world_size() == 2
    assert distributed.global_rank() == 1 and not distributed.is_global_zero()
    for v in LAUNCH_ENV:
        clean_env.delenv(v, raising=False)
    clean_env.setenv("LOCAL_RANK", "1")  # a process Lightning's own ddp launcher started
    assert not distributed.is_global_zero()
    clean_env.setenv("LOCAL_RANK", "0")
    clean_env.setenv("NODE_RANK", "1")
    assert not distributed.is_global_zero()
    clean_env.delenv("LOCAL_RANK")
    clean_env.delenv("NODE_RANK")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_PROCID", "3")
    assert distributed.global_rank() == 3


def test_strategy_names_and_launch_checks(clean_env):
    from deftlab.train.strategies import make_strategy, strategy_name

    assert strategy_name(load_profile("smoke")) == "auto"
    assert strategy_name(load_profile("smoke", devices=2)) == "ddp_spawn"
    for k, v in {"RANK": "0", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    assert strategy_name(load_profile("smoke", devices=2)) == "ddp"
    assert make_strategy(load_profile("smoke", devices=2, strategy="ddp")) == "ddp"
    with pytest.raises(DeftlabError, match="torchrun started 2 processes.*--devices"):
        make_strategy(load_profile("smoke"))
    with pytest.raises(DeftlabError, match="spawns its own processes"):
        make_strategy(load_profile("smoke", devices=2, strategy="ddp_spawn"))


def test_profile_validates_strategies():
    assert load_profile("smoke", strategy="fsdp", devices=2).fsdp_sharding == "FULL_SHARD"
    with pytest.raises(ConfigError, match="this machine only"):
        load_profile("smoke", strategy="ddp_spawn", num_nodes=2)
    with pytest.raises(ConfigError):
        load_profile("smoke", strategy="horovod")
    with pytest.raises(ConfigError):
        load_profile("smoke", fsdp_sharding="ZERO3")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match="needs the deepspeed package.*pip install deepspeed"):
            load_profile("smoke", strategy="deepspeed")


def test_fsdp_strategy_settings_and_model_checks():
    import pytorch_lightning as pl
    from torch.distributed.fsdp import ShardingStrategy

    from deftlab.train.strategies import DeftFSDPStrategy, make_strategy

    model = tiny_llama()
    layer = type(model.model.layers[0])
    s = make_strategy(load_profile("paper", strategy="fsdp", devices=8, micro_batch_size=2), model)
    assert isinstance(s, DeftFSDPStrategy) and s._state_dict_type == "full"
    assert s.sharding_strategy == ShardingStrategy.FULL_SHARD and s.kwargs["use_orig_params"]
    assert s.kwargs["auto_wrap_policy"]._module_classes == {layer} and s.kwargs["sync_module_states"]
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {layer}  # paper: on
    off = make_strategy(load_profile("gpu", strategy="fsdp", fsdp_sharding="SHARD_GRAD_OP"), model)
    assert off._activation_checkpointing_kwargs == {} and off.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    pl.Trainer(accelerator="cpu", devices=1, strategy=s, logger=False)  # Lightning's "GPU only" check passes
    model.model.layers[0].mlp.up_proj.weight.requires_grad = False
    with pytest.raises(DeftlabError, match="fsdp shards full fine-tuning.*strategy ddp for adapters"):
        make_strategy(load_profile("smoke", strategy="fsdp"), model)
    with pytest.raises(DeftlabError, match="optimizer 'galore' with strategy fsdp"):
        make_strategy(load_profile("smoke", strategy="fsdp"), tiny_llama(), optimizer="galore")


# --- training ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fit_kind():
    job.register()
    yield
    unregister_kind(job.KIND)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_device_ddp_and_fsdp_train_on_cpu(clean_env, fit_kind, tmp_path, strategy):
    """strategy ddp / fsdp with devices=1 (one gloo process, this one): the same run as strategy auto."""
    params = {"profile": {"max_steps": 2, "strategy": strategy, "gradient_checkpointing": True},
              "trainable": [""]}
    ref = execute(make_spec(job.KIND, one_process(params)), ResultsStore(tmp_path / "ref"))
    rec = execute(make_spec(job.KIND, params), ResultsStore(tmp_path / "run"))
    assert rec["metrics"]["strategy"] == strategy
    assert rec["metrics"]["loss_curve"] == pytest.approx(ref["metrics"]["loss_curve"], rel=RTOL)
    assert rec["metrics"]["eval_loss"] == pytest.approx(ref["metrics"]["eval_loss"], rel=RTOL)


def test_torchrun_two_processes_match_one_process_and_record_once(clean_env, fit_kind, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU) runs the whole command in both processes: DDP (adapter-like:
    q/v trainable, strategy auto) and FSDP (full fine-tuning) give one process's loss curve, weights and rank-0
    evaluation at the same global batch, and rank 0 alone writes the record, the logs and the evaluation."""
    runs = [DDP_LORA, FSDP_FULL]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), WANDB_MODE="disabled",
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(Path(job.__file__)), str(tmp_path / "two"), json.dumps(runs)],
                         env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    by_rank = {r: [x for x in results if x["rank"] == r] for r in (0, 1)}
    assert [len(by_rank[0]), len(by_rank[1])] == [2, 2]
    assert all(x["recorded"] for x in by_rank[0]) and not any(x["recorded"] for x in by_rank[1])

    store = ResultsStore(tmp_path / "two")
    records = list(store.records(job.KIND))
    assert len(records) == 2  # one per run: rank 0's
    base = store.root / job.KIND
    assert sorted(p.name for p in base.iterdir() if p.name.startswith(".")) == []  # nothing in flight or failed
    ref_store = ResultsStore(tmp_path / "one")
    for params, rank0 in zip(runs, by_rank[0]):
        spec = make_spec(job.KIND, params)
        rec = store.load(job.KIND, spec.key)
        m = rec["metrics"]
        assert rec["run"]["pid"] == rank0["pid"] == m["pid"] and m["global_rank"] == 0 and m["world_size"] == 2
        run_dir = store.run_dir(job.KIND, spec.key)
        assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0"]  # one logger: rank 0's
        ref = execute(make_spec(job.KIND, one_process(params)), ref_store)
        assert m["strategy"] == ("ddp" if params is DDP_LORA else "fsdp")
        assert len(m["loss_curve"]) == 3
        assert m["loss_curve"] == pytest.approx(ref["metrics"]["loss_curve"], rel=RTOL)
        assert m["eval_loss"] == pytest.approx(ref["metrics"]["eval_loss"], rel=RTOL)  # rank 0's trained model
        mine = load_file(str(run_dir / FINAL_WEIGHTS))
        theirs = load_file(str(ref_store.run_dir(job.KIND, ref["key"]) / FINAL_WEIGHTS))
        assert set(mine) == set(theirs)
        for name, t in theirs.items():
            torch.testing.assert_close(mine[name], t, rtol=RTOL, atol=ATOL)


def _recipe_guards_ranks() -> bool:
    import inspect

    from deftlab.recipes import finetune

    return "is_global_zero" in inspect.getsource(finetune.run_finetune)


@pytest.mark.skipif(not _recipe_guards_ranks(), reason="recipes/finetune.py lacks the rank-0 evaluation guard")
def test_torchrun_deftlab_finetune_records_once(clean_env, tmp_path):
    """`torchrun --nproc_per_node 2 -m deftlab finetune` (DeFT-style LoRA run, strategy auto = ddp): one record,
    one CSV log, one evaluation, written by rank 0; rank 1 trains and exits cleanly."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), WANDB_MODE="disabled",
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "deftlab", "finetune", "--model", "tiny", "--task", "generated", "--method", "dense",
                          "--adapter", "lora", "--profile", "smoke", "--devices", "2", "--max-steps", "2",
                          "--eval-limit", "2", "--results", str(tmp_path), "--no-progress"],
                         env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    store = ResultsStore(tmp_path)
    (rec,) = list(store.records("finetune"))
    assert rec["metrics"]["train_steps"] == 2 and rec["config"]["training_profile"]["devices"] == 2
    run_dir = store.run_dir("finetune", rec["key"])
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"] and (run_dir / "eval").is_dir()
    assert [p.name for p in (store.root / "finetune").iterdir() if p.name.startswith(".")] == []
