"""`python -m sweeps.run STUDY.yaml ...`: the same command as `mvar sweep` (mvar/commands/sweep.py: its
--help, its flags, the checks before a study runs), as a module (what `ray job submit` runs).
"""
from __future__ import annotations

import sys

from mvar.commands import run_cli, standalone
from mvar.commands.sweep import DESCRIPTION, configure


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m sweeps.run", DESCRIPTION, configure), argv, name="sweeps.run")


if __name__ == "__main__":
    sys.exit(main())
