"""Evaluate a checkpoint or a training run: `mvar eval` (mvar/commands/evaluate.py), as a module.

    python -m workflows.evaluate --run-id RUN --reference REF.npz [--num-per-class 50] [--cfg 1.5,2.0] [key.sub=value ...]
    python -m workflows.evaluate --checkpoint DIR --reference REF.npz --num-workers 8 --use-gpu

Under `ray job submit` the sampling tasks run on the cluster (one GPU each with --use-gpu);
locally a Ray on 127.0.0.1 is started for the run.
"""
from __future__ import annotations

import sys

from mvar.commands import run_cli, standalone
from mvar.commands.evaluate import DESCRIPTION, configure


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m workflows.evaluate", DESCRIPTION, configure), argv, name="workflows.evaluate")


if __name__ == "__main__":
    sys.exit(main())
