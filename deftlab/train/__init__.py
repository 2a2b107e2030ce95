"""Fine-tuning with PyTorch Lightning: profiles, data, the LightningModule, the Trainer and its loggers.

Lightning is imported only when a training object is used (`from deftlab.train import fit` does import it).
"""

from __future__ import annotations

import importlib

from deftlab.train.profiles import TrainProfile, load_profile, profile_names

_LAZY = {
    "fit": "deftlab.train.trainer",
    "build_trainer": "deftlab.train.trainer",
    "last_checkpoint": "deftlab.train.trainer",
    "DeftLightningModule": "deftlab.train.module",
    "masked_lm_loss": "deftlab.train.module",
    "TaskDataModule": "deftlab.train.datamodule",
    "encode_example": "deftlab.train.datamodule",
    "make_loggers": "deftlab.train.loggers",
}

__all__ = ["TrainProfile", "load_profile", "profile_names", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deftlab.train' has no attribute {name!r}")
