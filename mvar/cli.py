"""The `mvar` console script: one entry point, one subcommand per small job.

Each subcommand lives beside the code it drives and contributes its parser
through a ``register(subparsers)`` function; heavy imports happen inside the
command functions so that `mvar --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mvar.config import ConfigError
from mvar.errors import UserError

# module path of each command group, in the order `mvar --help` lists them
COMMAND_MODULES = (
    "mvar.commands.import_var",
    "mvar.commands.sample",
    "mvar.commands.bench",
    "mvar.commands.evaluate",
    "mvar.data.commands",
    "mvar.report",
    "mvar.stack",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mvar", description="MVAR / VAR experiment tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a command group that is not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError, FileNotFoundError) as err:
        print(f"mvar {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
