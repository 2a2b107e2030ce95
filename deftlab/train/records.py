"""Run records: Lightning loggers (W&B offline by default, CSV always) and a local JSON + one-row CSV per run.

W&B mode: the `wandb_mode` argument, else the WANDB_MODE environment variable, else "offline" (files under
<run_dir>/wandb, sync later with `wandb sync`). "disabled" skips W&B. If wandb cannot be imported or initialised,
training continues with the CSV logger and a warning.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path

from deftlab.manifest import build_manifest, write_json_atomic

WANDB_MODES = ("offline", "online", "disabled")
RECORD_JSON = "record.json"
RECORD_CSV = "record.csv"


def resolve_wandb_mode(mode: str | None = None) -> str:
    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in WANDB_MODES:
        warnings.warn(f"unknown W&B mode '{mode}', using offline", stacklevel=2)
        mode = "offline"
    return mode


def make_loggers(run_dir: str | os.PathLike, *, run_name: str, config: dict | None = None,
                 wandb_mode: str | None = None, project: str = "deftlab") -> list:
    """[WandbLogger (unless disabled or failing), CSVLogger] writing under `run_dir`."""
    from pytorch_lightning.loggers import CSVLogger

    run_dir = Path(run_dir)
    loggers: list = []
    mode = resolve_wandb_mode(wandb_mode)
    if mode != "disabled":
        try:
            from pytorch_lightning.loggers import WandbLogger

            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            id_file = run_dir / "wandb_id.txt"  # same W&B run across resumes
            run_id = id_file.read_text().strip() if id_file.exists() else None
            wb = WandbLogger(project=project, name=run_name, save_dir=str(run_dir), mode=mode, id=run_id,
                             resume="allow" if run_id else None, config=config or {})
            exp = wb.experiment  # initialise now, so a failure falls back here rather than mid-training
            if not id_file.exists() and getattr(exp, "id", None):
                id_file.write_text(str(exp.id))
            loggers.append(wb)
        except Exception as e:  # noqa: BLE001  (any wandb failure must not stop training)
            warnings.warn(f"W&B logging unavailable ({type(e).__name__}: {e}); continuing with the CSV logger",
                          stacklevel=2)
    # one version_<k> folder per attempt: Lightning's CSV writer deletes an existing metrics.csv, and a resumed
    # run must not erase the interrupted attempt's log
    loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    return loggers


def finish_loggers(loggers: list, status: str = "success") -> None:
    """Flush and close the loggers (and the W&B run, which Lightning leaves open)."""
    for lg in loggers:
        try:
            lg.finalize(status)
            if type(lg).__name__ == "WandbLogger":
                import wandb

                wandb.finish(exit_code=0 if status == "success" else 1)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"could not finalise logger {type(lg).__name__}: {e}", stacklevel=2)


def count_parameters(model) -> dict:
    """{total, trainable, ...}: deftlab.surgery.params.count_params when available, else a plain count."""
    try:
        from deftlab.surgery.params import count_params

        return dict(count_params(model))
    except ImportError:
        seen, total, trainable = set(), 0, 0
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return {"total": total, "trainable": trainable}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def write_run_record(run_dir: str | os.PathLike, *, config: dict, seed: int | None, model=None,
                     params: dict | None = None, train: dict | None = None, metrics: dict | None = None,
                     wall_time_s: float | None = None, extra: dict | None = None) -> dict:
    """Write <run_dir>/record.json (manifest + results, atomically) and record.csv (one row); return the record.

    `train` is `fit`'s stats (peak memory, tokens/s, ...), `metrics` maps eval set → metrics dict.
    """
    run_dir = Path(run_dir)
    if params is None and model is not None:
        params = count_parameters(model)
    train = dict(train or {})
    results = {
        "params": params or {},
        "peak_memory_bytes": train.get("peak_memory_bytes"),
        "train_tokens_per_s": train.get("tokens_per_s"),
        "wall_time_s": wall_time_s,
        "train": {k: v for k, v in train.items() if k != "losses"},
        "metrics": metrics or {},
    }
    record = build_manifest(config, seed, extra={"results": results, **(extra or {})})
    write_json_atomic(run_dir / RECORD_JSON, record)
    row = {"run_dir": str(run_dir), "seed": seed, "created_at": record["created_at"],
           "git_commit": record["git_commit"], **_flatten(results)}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)
    tmp = run_dir / f".{RECORD_CSV}.tmp{os.getpid()}"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, run_dir / RECORD_CSV)
    return record
