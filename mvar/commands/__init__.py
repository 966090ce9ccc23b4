"""What every command of the project shares: its parser class, the config arguments and `run_cli`.

One command surface: `mvar COMMAND` (the table in ``mvar.cli``) and the module entry points
that `ray job submit` runs (`python -m workflows.train`, `python -m sweeps.run` ...) build the
same parsers from the same functions, and both run through ``run_cli``:

- every flag has help text, and help shows a flag's default where it has one;
- a command that takes a config takes `--config FILE` and `key.sub=value` overrides (positional,
  anywhere on the line), plus `--print-config` and `--check`; other flags are documented
  shorthands of config keys;
- a user error (``UserError``; ``ConfigError`` is one) is one line `PROG: error: ...` and exit 2,
  as argparse does for a bad flag.

No heavy import here or in the command modules' parsers: `mvar --help` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mvar.errors import UserError


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter plus `(default: X)` for a flag with a default its help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, "", [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The project's parser: its help formatter, and `key.sub=value` overrides accepted between flags
    (intermixed parsing) on every parser without sub-commands. Sub-command parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls this method again, twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def standalone(prog: str, description: str, configure: Callable[[argparse.ArgumentParser], None]) -> Parser:
    """The parser of a module entry point (`python -m workflows.train`): the same ``configure`` as its
    `mvar` sub-command."""
    parser = Parser(prog=prog, description=description)
    configure(parser)
    return parser


def add_config_arguments(p: argparse.ArgumentParser, config_help: str, overrides: bool = True,
                         overrides_help: str = "", check_help: str = "") -> None:
    """`--config` (unless ``config_help`` is empty: a command whose config is a positional), the
    `key.sub=value` overrides (unless a sub-command action takes them), `--print-config` and `--check`."""
    if config_help:
        p.add_argument("--config", default=None, help=config_help)
    if overrides:
        p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value",
                       help=overrides_help or "config overrides applied after the file and the flags, anywhere "
                                              "on the line, e.g. run.steps=100 (every key: docs/config.md)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check", action="store_true", help=check_help or "check the config and every input the run "
                   "would check before it starts, print OK, exit")


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    """`--verbose`: Ray's own INFO/WARNING messages back in the output (mvar.cluster.verbose)."""
    p.add_argument("--verbose", action="store_true", help="also Ray's own INFO/WARNING messages (hidden by "
                   "default), in this process and its Ray workers; the same as MVAR_VERBOSE=1")


def set_verbose(args: argparse.Namespace) -> None:
    """--verbose into the environment, where Ray workers and sweep trials' processes inherit it."""
    if getattr(args, "verbose", False):
        os.environ["MVAR_VERBOSE"] = "1"  # mvar.cluster.VERBOSE_ENV (not imported: `mvar --help` stays light)


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None, name: str = "") -> int:
    """Parse ``argv``, run ``args.func(args)``; a user error is one line `NAME: error: ...`, exit 2.

    ``name`` defaults to the parser's prog and, for `mvar`, the sub-command (`mvar eval`). A missing
    file the user named (FileNotFoundError, e.g. an output directory that is not there) counts as a
    user error; any other exception is a bug and keeps its traceback."""
    args = parser.parse_args(argv)
    name = name or " ".join(part for part in (parser.prog, getattr(args, "command", "")) if part)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2


class _CommandNames(dict):
    """Sub-command name -> parser; a `key.sub=value` override passes argparse's check of the first positional."""

    def __contains__(self, item) -> bool:
        return dict.__contains__(self, item) or (isinstance(item, str) and "=" in item)


class SubcommandsOrOverrides(argparse._SubParsersAction):
    """Sub-commands of a command that also takes `key.sub=value` overrides (`mvar eval make-ref ...` and
    `mvar eval eval.seed=1 --checkpoint DIR`): a first positional that is no sub-command starts the
    command's own overrides, and the rest of the line is parsed by ``own`` (the command's parser without
    sub-commands, e.g. that of `python -m workflows.evaluate`)."""

    def __init__(self, *args, own: argparse.ArgumentParser, **kwargs):
        super().__init__(*args, **kwargs)
        self.own = own
        self._name_parser_map = self.choices = _CommandNames(self._name_parser_map)

    def __call__(self, parser, namespace, values, option_string=None):
        if values and dict.__contains__(self._name_parser_map, values[0]):
            return super().__call__(parser, namespace, values, option_string)
        for action in self.own._actions:  # the positionals are own's to fill (its flags' values are kept)
            if not action.option_strings and hasattr(namespace, action.dest):
                delattr(namespace, action.dest)
        self.own.parse_args(values, namespace)
        return None
