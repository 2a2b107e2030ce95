"""Where things live: data directory, cache directory, results directory.

Each location is resolved as: explicit argument > environment variable > default.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "DEFTLAB_DATA_DIR"
CACHE_ENV = "DEFTLAB_CACHE"
RESULTS_ENV = "DEFTLAB_RESULTS"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Root of deftlab's caches (converted checkpoints, decompositions, statistics)."""
    if override:
        p = Path(override)
    elif os.environ.get(CACHE_ENV):
        p = Path(os.environ[CACHE_ENV])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        p = Path(base) / "deftlab"
    p = p.expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


def data_dir(override: str | os.PathLike | None = None) -> Path | None:
    """The real-data directory (layout of ../shared/data), or None when not configured.

    None is not an error by itself: loaders then try the hub, and fail with a message
    naming the file and both ways to provide it.
    """
    if override:
        return Path(override).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return None


def results_dir(override: str | os.PathLike | None = None) -> Path:
    """Results store root (run records); defaults to ./results in the working directory."""
    if override:
        p = Path(override)
    elif os.environ.get(RESULTS_ENV):
        p = Path(os.environ[RESULTS_ENV])
    else:
        p = Path.cwd() / "results"
    return p.expanduser()


def hub_offline() -> bool:
    """True when the user (or this machine) asks for no hub access."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DEFTLAB_OFFLINE")
    )
