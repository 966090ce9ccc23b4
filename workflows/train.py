"""Train a VAR or MVAR generator with Ray Train: `mvar train` (mvar/commands/train.py), as a module.

    python -m workflows.train --config workflows/configs/mvar_tiny_local.yaml [a.b=c ...]
    python -m workflows.train --config workflows/configs/mvar_tiny_local.yaml --repeats 3   # seeds 0, 1, 2
    ray job submit --working-dir . -- python -m workflows.train --config workflows/configs/mvar_d16_in256.yaml

Joins the cluster of `ray job submit` (or RAY_ADDRESS), else starts a local Ray on 127.0.0.1.
Rerunning the same command resumes the run from its latest checkpoint and continues the same MLflow run
(with --repeats: each seed's run, under the same group run).
"""
from __future__ import annotations

import sys

from mvar.commands import run_cli, standalone
from mvar.commands.train import TRAIN, configure_train


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m workflows.train", TRAIN, configure_train), argv, name="workflows.train")


if __name__ == "__main__":
    sys.exit(main())
