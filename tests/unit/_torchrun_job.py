"""One process of a torchrun launch for tests/unit/test_distributed.py (not a test module itself).

Every process runs this whole script, as every process of `torchrun -m deftlab finetune` runs the whole command:
each records the runs given as JSON on the command line through the results store (`execute_waiting`, what
`deftlab finetune` calls). A `ddp_fit` run fine-tunes the tiny model with `deftlab.train.fit` and then, on rank 0
only, stands in for the recipe's evaluation. Each process prints one "RESULT {json}" line per run.

    python -m torch.distributed.run --nproc_per_node 2 tests/unit/_torchrun_job.py RESULTS_DIR '[{...}, ...]'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

KIND = "ddp_fit"


def profile_of(params: dict):
    from deftlab.train.profiles import load_profile

    return load_profile("smoke", **params["profile"])


def fit_run(params: dict, run_dir, **_options) -> dict:
    from deftlab.models.tiny import TinyTokenizer, tiny_llama
    from deftlab.tasks import get_task
    from deftlab.train.distributed import is_global_zero
    from deftlab.train.trainer import fit

    torch.set_num_threads(1)
    model = tiny_llama(max_position_embeddings=512)
    for n, p in model.named_parameters():  # "" trains everything (full fine-tuning), else an adapter stand-in
        p.requires_grad = any(t in n for t in params["trainable"])
    stats = fit(model.train(), TinyTokenizer(), get_task("generated", n_train=64, n_test=8), profile_of(params),
                run_dir, loggers="auto", wandb_mode="disabled", progress=False)
    if not is_global_zero():  # the guard the recipes carry: rank 0 evaluates and records
        return {"global_rank": stats["global_rank"]}
    with torch.no_grad():  # "evaluation" on rank 0's (unwrapped, trained) model, alone (rank 1 may have left)
        ids = torch.arange(1, 33).unsqueeze(0)
        eval_loss = float(model(input_ids=ids, labels=ids).loss)
        model.generate(input_ids=ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    (Path(run_dir) / "eval.json").write_text(json.dumps({"loss": eval_loss}))
    return {"loss_curve": stats["loss_curve"], "global_rank": stats["global_rank"], "strategy": stats["strategy"],
            "world_size": stats["world_size"], "eval_loss": eval_loss, "pid": os.getpid()}


def register() -> None:
    from deftlab.config import to_dict
    from deftlab.experiments.kinds import register_kind

    register_kind(KIND, fit_run, replace=True, config=lambda p: {"training_profile": to_dict(profile_of(p))})


def main(root: str, runs: list[dict]) -> None:
    from deftlab.experiments.runner import execute_waiting, make_spec
    from deftlab.store import ResultsStore
    from deftlab.train.distributed import global_rank

    register()
    store = ResultsStore(root)
    for params in runs:
        rec = execute_waiting(make_spec(KIND, params), store)
        print("RESULT " + json.dumps({"rank": global_rank(), "pid": os.getpid(),
                                      "recorded": rec.get("recorded", True), "metrics": rec["metrics"]}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
