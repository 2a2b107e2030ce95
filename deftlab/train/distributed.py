"""Which process this is in a multi-process training run (cheap: no torch or Lightning import).

A run on several processes starts one of two ways. Spawned (strategy ddp_spawn / ddp_fork, or "auto" with more
than one device): the launching process creates the others inside `trainer.fit` and alone keeps the run's record
and evaluation. Launched (torchrun, srun, or Lightning's own "ddp" launcher re-running the command): every process
runs the whole command, builds the model and trains; only global rank 0 claims the run in the results store,
evaluates, logs to W&B and writes the record (`is_global_zero`). The other ranks train, then leave.
"""

from __future__ import annotations

import os
import sys

SPAWNING = ("ddp_spawn", "ddp_fork")
# Lightning's TorchElasticEnvironment.detect(): what torchrun / torch.distributed.run set in each process
TORCHRUN_ENV = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launched_externally() -> bool:
    """True in a process that torchrun started (every process runs the whole command)."""
    return all(v in os.environ for v in TORCHRUN_ENV)


def launched_world_size() -> int | None:
    """WORLD_SIZE of a torchrun launch, else None."""
    return int(os.environ["WORLD_SIZE"]) if launched_externally() and "WORLD_SIZE" in os.environ else None


def global_rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's environment
    (torchrun's RANK, SLURM_PROCID of a multi-task job, or LOCAL_RANK/NODE_RANK of Lightning's ddp launcher, where
    only rank 0 is exact). 0 in a plain single process."""
    dist = sys.modules.get("torch.distributed")  # already imported if initialised: never import torch here
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    local = int(env.get("LOCAL_RANK", "0"))
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    return node * max(int(env.get("LOCAL_WORLD_SIZE", "1")), 1) + local


def is_global_zero() -> bool:
    """Whether this process writes records, evaluation, predictions and W&B logs (rank 0 of any launch)."""
    return global_rank() == 0
