"""Evaluate a checkpoint or a training run: distributed sampling, FID / IS / precision / recall, MLflow.

    python -m workflows.evaluate --run-id RUN --reference REF.npz [--num-per-class 50] [--cfg 1.5,2.0] [--seed 0]
    python -m workflows.evaluate --checkpoint DIR --reference REF.npz --num-workers 8 --use-gpu

Under `ray job submit` the sampling tasks run on the cluster (one GPU each with --use-gpu);
locally a Ray on 127.0.0.1 is started for the run. The same as `mvar eval` (see its --help).
"""
from __future__ import annotations

import argparse
import sys

from mvar.commands.evaluate import add_eval_arguments, run
from mvar.config import ConfigError
from mvar.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.evaluate", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)  # builds and checks the config, then every input, before sampling starts
    except (ConfigError, UserError, FileNotFoundError) as err:
        print(f"workflows.evaluate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
