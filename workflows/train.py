"""Train a VAR or MVAR generator with Ray Train.

    python -m workflows.train --config workflows/configs/mvar_tiny_local.yaml [a.b=c ...]
    ray job submit --working-dir . -- python -m workflows.train --config workflows/configs/mvar_d16_in256.yaml

Joins the cluster of `ray job submit` (or RAY_ADDRESS), else starts a local
Ray on 127.0.0.1. Rerunning the same command resumes the run from its latest
checkpoint and continues the same MLflow run.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mvar.config import ConfigError
from mvar.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (workflows/configs/...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.steps=100")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also Ray's own INFO/WARNING messages (the same as MVAR_VERBOSE=1)")
    args = parser.parse_args(argv)
    from mvar import cluster
    cluster.set_verbose(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mvar.config import dump_yaml
    from mvar.training import load_train_config, train
    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        outcome = train(cfg)
    except (ConfigError, UserError) as err:
        print(f"workflows.train: error: {err}", file=sys.stderr)
        return 2
    print(f"done: {outcome.step} steps, MLflow run {outcome.run_id}, checkpoint {outcome.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
