"""Every CLI flag that sets a run param defaults to its config field's default (or to unset, which means the
same): a default lives once, in the config class."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from deftlab.cli import build_parser
from deftlab.commands._args import config_default
from deftlab.config import flat_fields
from deftlab.recipes.compress import CompressConfig
from deftlab.recipes.finetune import FinetuneConfig

# subcommand -> the config class whose params its flags set. (`demo` is left out on purpose: its flags are the
# demo's own small budget, e.g. --calib-n 64, which it passes explicitly as params.)
COMMANDS = {"finetune": FinetuneConfig, "decompose": CompressConfig, "eval-ppl": CompressConfig}


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def disagreements(parser: argparse.ArgumentParser, cls: type) -> list[str]:
    params = flat_fields(cls)
    out = []
    for action in parser._actions:
        if action.dest not in params or action.default in (None, argparse.SUPPRESS):
            continue
        want = config_default(cls, action.dest)
        have = action.default
        if isinstance(want, tuple):
            want = list(want)
        if isinstance(have, tuple):
            have = list(have)
        if want is dataclasses.MISSING or have != want:
            out.append(f"{'/'.join(action.option_strings)} defaults to {action.default!r}, "
                       f"{cls.__name__}.{action.dest} to {want!r}")
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flag_defaults_agree_with_the_config(command):
    parser = _subparser(command)
    assert disagreements(parser, COMMANDS[command]) == []
    # and the flags do reach the config: at least the model and one decomposition / perplexity param
    dests = {a.dest for a in parser._actions}
    assert {"model", "device"} <= dests and dests & set(flat_fields(COMMANDS[command])) - {"model", "device"}


def test_a_flag_with_its_own_default_is_caught():
    p = argparse.ArgumentParser()
    p.add_argument("--calib-n", dest="calib_n", type=int, default=128)  # DecompositionConfig says 256
    p.add_argument("--device", default="auto")  # agrees with ModelConfig
    assert disagreements(p, FinetuneConfig) == ["--calib-n defaults to 128, FinetuneConfig.calib_n to 256"]


def test_help_shows_the_config_default():
    text = _subparser("finetune").format_help()
    assert "(default 256)" in text  # --calib-n, from DecompositionConfig
    assert "cpu-small" in text  # --profile, from FinetuneConfig
