"""Locations inside the deftlab checkout (configs/, experiments/)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def configs_dir() -> Path:
    return Path(os.environ.get("DEFTLAB_CONFIGS", REPO_ROOT / "configs"))


def experiments_dir() -> Path:
    return Path(os.environ.get("DEFTLAB_EXPERIMENTS", REPO_ROOT / "experiments"))
