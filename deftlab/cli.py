"""`deftlab` command line. Each subcommand lives in deftlab/commands/<name>.py with add_parser() and run()."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from deftlab.errors import DeftlabError

# subcommand name -> module under deftlab.commands
COMMANDS = {
    "info": "info",
    "eval-ppl": "eval_ppl",
    "decompose": "decompose",
    "finetune": "finetune",
    "run": "run",
    "show": "show",
    "sweep": "sweep",
    "delta": "delta",
    "demo": "demo",
    "plan": "plan",
    "eval-lm": "eval_lm",
    "export": "export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deftlab",
        description="Reproducible DeFT (decompose, then fine-tune), WeLore and OSD experiments.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"deftlab.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"deftlab.commands.{module}":
                raise
            continue  # subcommand not present in this build
        p = mod.add_parser(sub, name)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except DeftlabError as e:
        print(f"deftlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deftlab: interrupted (recorded results are kept; re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
