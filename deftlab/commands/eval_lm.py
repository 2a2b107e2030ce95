"""deftlab eval-lm: lm-evaluation-harness tasks on a model or a recorded run's model (run kind "lm_eval").

    deftlab eval-lm smollm2-135m --tasks deftlab_gsm8k --limit 20
    deftlab eval-lm 3fa9c2 --tasks zeroshot7          (a finetune or compress run's key, or its directory)
    deftlab eval-lm delta-osd-2%.safetensors --tasks deftlab_arith

The run is the one `deftlab run` would make from the same params (same key, same record).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deftlab.commands._args import add_store_args, csv_list, param_flag, params_of, record_run
from deftlab.config import flat_fields
from deftlab.errors import DeftlabError
from deftlab.recipes.lm_eval_run import LmEvalConfig

CFG = LmEvalConfig
PARAMS = tuple(flat_fields(LmEvalConfig))


def add_parser(sub, name):
    p = sub.add_parser(name, help="lm-evaluation-harness tasks (local deftlab_* sets, zeroshot7) on a model or run",
                       description="Evaluate a model in memory through lm-eval's HFLM and record it in the results "
                                   "store. SOURCE: a model (configs/models name, hub id, local HF directory), a "
                                   "`deftlab delta export` file, or a recorded finetune/compress run (key or "
                                   "directory; its model is rebuilt, adapters merged). Local tasks: deftlab_<set> "
                                   "(addsub, singleeq, multiarith, svamp, gsm8k, aqua, mawps, generated, math500), "
                                   "group deftlab_arith; hub tasks: any lm-eval task, group zeroshot7 (BoolQ, PIQA, "
                                   "HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA).")
    p.add_argument("source", metavar="RUN|MODEL", help="model name/dir, delta file, or run key/directory")
    p.add_argument("--tasks", type=csv_list, default=None, help="comma list of lm-eval tasks or groups "
                   f"(default {','.join(CFG.tasks)})")
    param_flag(p, CFG, "num_fewshot", type=int, show_default=False, help="shots (default: each task's own, 0 here)")
    param_flag(p, CFG, "limit", type=int, show_default=False, help="first N documents per task")
    param_flag(p, CFG, "batch_size", type=int)
    param_flag(p, CFG, "max_new_tokens", type=int, show_default=False,
               help="local tasks: generation budget (default: the deftlab task's)")
    p.add_argument("--task-option", action="append", default=None, metavar="K=V",
                   help="deftlab task option for the local tasks, e.g. prompt_style=llm-adapters (repeatable)")
    param_flag(p, CFG, "seed", type=int)
    param_flag(p, CFG, "dtype", help="float32 | bfloat16 | float16 (model sources; unset: the model config's)",
               show_default=False)
    param_flag(p, CFG, "device", help="cpu | cuda | auto (model sources)")
    p.add_argument("--data-dir", dest="data_dir", default=None,
                   help="real-data directory (default: $DEFTLAB_DATA_DIR)")
    add_store_args(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise DeftlabError(f"--task-option '{text}' is not KEY=VALUE", "e.g. --task-option prompt_style=plain")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def source_params(source: str, results: str | None) -> dict:
    """The params naming SOURCE: {model}, {delta} or {run} (a run as "kind/key", so its key does not depend on
    where the store lives)."""
    from deftlab.models.registry import model_specs
    from deftlab.store import ResultsStore

    path = Path(source).expanduser()
    if source in model_specs():
        return {"model": source}
    if path.is_dir() and (path / "record.json").is_file():
        return {"run": str(path.resolve())}
    if path.is_dir():
        return {"model": str(path.resolve())}  # an exported HF model directory
    if path.is_file() and path.suffix == ".safetensors":
        return {"delta": str(path.resolve())}
    try:
        rec = ResultsStore(results).find(source)
        return {"run": f"{rec['kind']}/{rec['key']}"}
    except DeftlabError:
        if "/" in source and not path.exists():
            return {"model": source}  # a hub id
        raise


def run(args) -> int:
    if args.results:  # the run kind resolves "kind/key" in the default store: make it this one
        os.environ["DEFTLAB_RESULTS"] = str(Path(args.results).resolve())
    params = {**source_params(args.source, args.results), **params_of(args, PARAMS)}
    if args.tasks:
        params["tasks"] = list(args.tasks)
    if args.task_option:
        params["task_options"] = dict(_option(o) for o in args.task_option)
    rec = record_run("lm_eval", params, args)
    m = rec["metrics"]
    print(f"{m.get('source')} ({m.get('source_kind')}), lm-eval {m['lm_eval_version']}")
    for name, t in m["lm_eval_tasks"].items():
        err = f" ± {t['stderr']:.4f}" if t.get("stderr") is not None else ""
        print(f"{name:24s} {t['metric']:8s} {t['value']:.4f}{err}  (n={t['n']}, {t['num_fewshot']}-shot, "
              f"task version {t['version']})")
    for k, v in m.items():
        if k.endswith("_avg") and v is not None:
            print(f"{k:24s} {v:.4f}")
    if args.json:
        print(json.dumps(m, indent=2))
    return 0
