"""The `mvar` console script: one entry point, one subcommand per job.

The table below is the whole command surface. Each module contributes its parsers through a
``register(subparsers)`` function and lives beside the code it drives; its heavy imports happen
inside the command functions, so that `mvar --help` stays fast. The modules are imported
here, so one that fails to import is an error at once, not a command that goes missing.
`python -m workflows.train`, `python -m workflows.train_tokenizer`, `python -m workflows.evaluate`
and `python -m sweeps.run` build the same parsers (``mvar.commands.standalone``) and run
through the same ``run_cli``.
"""
from __future__ import annotations

import sys

from mvar import report, stack
from mvar.commands import (
    Parser,
    bench,
    evaluate,
    import_var,
    run_cli,
    sample,
    sweep,
    train,
)
from mvar.data import commands as data_commands

# in the order `mvar --help` lists them
COMMANDS = (import_var, sample, bench, evaluate, train, sweep, data_commands, report, stack)


def build_parser() -> Parser:
    parser = Parser(prog="mvar", description="MVAR / VAR experiment tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", help="run `mvar COMMAND --help` for its flags")
    subparsers.required = True
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
