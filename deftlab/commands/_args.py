"""Shared pieces of the subcommands: config-backed flags and running one run through the results store.

A flag that sets a run param takes its default from the config field that declares it (`param_flag`), so a
default lives once, in the config class; tests/unit/test_cli_defaults.py checks every such flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from deftlab.config import field_default, flat_fields
from deftlab.models import ModelConfig


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def config_default(cls: type, name: str) -> Any:
    """The default of flat param `name` in config class `cls` (dataclasses.MISSING when it has none)."""
    return field_default(flat_fields(cls)[name][1])


def param_flag(p, cls: type, name: str, *, help: str = "", show_default: bool = True, **kw) -> None:
    """--<name> for run param `name` of config `cls`; unset means the config's default (shown in the help)."""
    default = config_default(cls, name)
    if show_default and default is not dataclasses.MISSING:
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help = f"{help} (default {shown})" if help else f"default {shown}"
    p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=help, **kw)


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    param_flag(p, ModelConfig, "model", help="model name (configs/models), hub id or local dir")
    param_flag(p, ModelConfig, "dtype", help="float32 | bfloat16 | float16 (unset: the model config's)",
               show_default=False)
    param_flag(p, ModelConfig, "device", help="cpu | cuda | auto (auto: cuda when available)")
    p.add_argument("--data-dir", dest="data_dir", default=None,
                   help="real-data directory (default: $DEFTLAB_DATA_DIR)")


def add_blockwise_flag(p) -> None:
    p.add_argument("--blockwise", dest="blockwise", action="store_const", const=True, default=None,
                   help="calibrate, decompose and build one decoder block at a time from the checkpoint, never "
                        "loading the dense model (bounded memory; same ranks and model)")


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=None, help="results store root (default: $DEFTLAB_RESULTS, else ./results)")
    p.add_argument("--force", action="store_true", help="run again even if recorded (the old record is kept aside)")


def params_of(args, names) -> dict:
    """The run params among `names` that the command line set (unset ones take the config's defaults)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def record_run(kind: str, params: dict, args, *, options: dict | None = None, say=print) -> dict:
    """Run (or reuse) one run through the results store, exactly as `deftlab run` would; returns its record."""
    from deftlab.experiments.runner import execute_waiting, make_spec
    from deftlab.store import ResultsStore

    store = ResultsStore(getattr(args, "results", None))
    spec = make_spec(kind, params)
    state = store.status(spec.kind, spec.key).state
    force = bool(getattr(args, "force", False))
    say(f"{spec.ref}: {'recorded; reusing it' if state == 'done' and not force else state}")
    rec = execute_waiting(spec, store, force=force, progress=say, options=options)
    say(f"record {store.record_path(spec.kind, spec.key)}  (deftlab show {spec.key})")
    return rec
