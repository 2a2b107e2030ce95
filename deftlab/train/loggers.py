"""Lightning loggers for a training run: W&B (offline by default) and CSV (always). Run records are the store's.

W&B mode: the `wandb_mode` argument, else the WANDB_MODE environment variable, else "offline" (files under
<run_dir>/wandb, sync later with `wandb sync`). "disabled" skips W&B. If wandb cannot be imported or initialised,
training continues with the CSV logger and a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path


WANDB_MODES = ("offline", "online", "disabled")


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
