import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def real_data_dir() -> Path | None:
    env = os.environ.get("DEFTLAB_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand.resolve()
    return None


@pytest.fixture
def data_dir():
    d = real_data_dir()
    if d is None:
        pytest.skip("real data directory not available (set DEFTLAB_DATA_DIR)")
    return d


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty deftlab cache, so tests never touch the user's."""
    monkeypatch.setenv("DEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
