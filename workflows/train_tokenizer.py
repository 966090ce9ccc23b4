"""Train the multi-scale VQ tokenizer on image shards with Ray Train.

    python -m workflows.train_tokenizer --config workflows/configs/tokenizer_tiny_local.yaml [a.b=c ...]
    ray job submit --working-dir . -- python -m workflows.train_tokenizer --config workflows/configs/tokenizer_in256.yaml

Losses: L1 + L2 reconstruction and the multi-scale VQ loss, plus a VGG16
perceptual term when `losses.perceptual_weight` > 0 and `losses.perceptual_weights`
names a local torchvision vgg16 state dict (nothing is downloaded). The final
tokenizer checkpoint is written to `output` (default <run.storage_path>/<run.name>/tokenizer):
give it to `workflows.train` (`tokenizer: DIR`) and `mvar data tokenize --tokenizer DIR`.
Rerunning the same command resumes the run from its latest checkpoint and the same MLflow run.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mvar.config import ConfigError
from mvar.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.train_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (workflows/configs/tokenizer_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.steps=100")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="also Ray's own INFO/WARNING messages (the same as MVAR_VERBOSE=1)")
    args = parser.parse_args(argv)
    from mvar import cluster
    cluster.set_verbose(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mvar.config import dump_yaml
    from mvar.training.tokenizer_config import load_tokenizer_train_config
    from mvar.training.tokenizer_loop import train_tokenizer
    try:
        cfg = load_tokenizer_train_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        outcome, out = train_tokenizer(cfg)
    except (ConfigError, UserError) as err:
        print(f"workflows.train_tokenizer: error: {err}", file=sys.stderr)
        return 2
    print(f"done: {outcome.step} steps, MLflow run {outcome.run_id}, checkpoint {outcome.checkpoint}")
    print(f"tokenizer: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
