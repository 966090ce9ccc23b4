"""`mvar train` and `mvar train-tokenizer`: a generator or a tokenizer trained with Ray Train, or in one
process without Ray (`--local`).

    mvar train --config workflows/configs/mvar_tiny_local.yaml [key.sub=value ...]
    mvar train --config workflows/configs/mvar_tiny_local.yaml --repeats 3     # training seeds 0, 1, 2
    mvar train --config workflows/configs/mvar_tiny_local.yaml --local         # this process, one device
    mvar train-tokenizer --config workflows/configs/tokenizer_tiny_local.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m workflows.train --config workflows/configs/mvar_d16_in256.yaml

`python -m workflows.train` and `python -m workflows.train_tokenizer` are the same commands (what
`ray job submit` runs). A run joins the cluster of `ray job submit` (or RAY_ADDRESS), else starts a
local Ray on 127.0.0.1; rerunning the same command resumes it from its latest checkpoint into the
same MLflow run. `--repeats N` (run.repeats) trains N seeds, one run each, under a group run.
`--local` trains in this process on one device (no Ray imported or started; scaling.num_workers taken
as 1): the same MLflow run and checkpoints, so a local run resumes on Ray Train and the other way round.
"""
from __future__ import annotations

import argparse
import logging

from mvar.commands import add_config_arguments, add_verbose_argument, set_verbose
from mvar.errors import UserError

TRAIN = "Train a VAR or MVAR generator with Ray Train (or in this process: --local)."
TRAIN_TOKENIZER = "Train the multi-scale VQ tokenizer on image shards with Ray Train (or in this process: --local)."


def register(subparsers) -> None:
    configure_train(subparsers.add_parser("train", help="train a VAR or MVAR generator (Ray Train, or --local)",
                                          description=TRAIN))
    configure_train_tokenizer(subparsers.add_parser(
        "train-tokenizer", help="train the VQ tokenizer (Ray Train, or --local)", description=TRAIN_TOKENIZER))


def configure_train(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "YAML run config, e.g. workflows/configs/mvar_tiny_local.yaml")
    p.add_argument("--repeats", type=int, metavar="N", help="shorthand of run.repeats: train N seeds (run.seed, "
                   "run.seed+1, ...), one run `<name>-seed<seed>` each, nested under a group run `<name>` "
                   "(default: the config's, 1)")
    add_local_argument(p)
    add_verbose_argument(p)
    p.set_defaults(func=run_train)


def configure_train_tokenizer(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "YAML run config, e.g. workflows/configs/tokenizer_tiny_local.yaml")
    add_local_argument(p)
    add_verbose_argument(p)
    p.set_defaults(func=run_train_tokenizer)


def add_local_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true",
                   help="train in this process on one device (CUDA with scaling.use_gpu, else the CPU), without "
                        "Ray: the same checks, MLflow run and checkpoints (Ray Train resumes them, and a local "
                        "run resumes Ray Train's); scaling.num_workers is taken as 1")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def check_store(tracking_cfg) -> None:
    """The run's MLflow store answers (a UserError naming it if not); nothing is created in it."""
    from mvar.tracking import Store
    Store(tracking_cfg.uri).check(tracking_cfg.experiment)


def run_config(args: argparse.Namespace, cfg, prepare, checked: str) -> bool:
    """--print-config, or --check (``prepare`` and the MLflow store, then OK): True when the command is done."""
    if args.print_config:
        from mvar.config import dump_yaml
        print(dump_yaml(cfg), end="")
        return True
    if args.check:
        if getattr(args, "local", False):
            from mvar.training.local import check_local
            check_local(cfg)  # one process (run.epochs counts its global batch), its storage and device
        prepare(cfg)
        check_store(cfg.tracking)
        seeds = f" x {cfg.run.repeats} seeds" if cfg.run.repeats > 1 else ""
        print(f"OK: run '{cfg.run.name}', {cfg.run.steps} steps{seeds}: config, {checked} and the MLflow store checked "
              "(Ray's resources: when the run starts)")
        return True
    return False


def repeats_override(args: argparse.Namespace) -> list[str]:
    """`--repeats N` as its config key (after the overrides: the flag wins), refused below 1."""
    if args.repeats is None:
        return []
    if args.repeats < 1:
        raise UserError(f"--repeats: must be >= 1 (the number of training seeds), got {args.repeats}")
    return [f"run.repeats={args.repeats}"]


def run_train(args: argparse.Namespace) -> int:
    set_verbose(args)
    _setup_logging()
    from mvar.training import load_train_config
    from mvar.training.launch import train_repeats
    from mvar.training.tasks import prepare
    cfg = load_train_config(args.config, [*args.overrides, *repeats_override(args)])
    if run_config(args, cfg, prepare, "tokenizer, shards, init_from"):
        return 0
    outcomes = train_repeats(cfg, local=args.local)
    for outcome in outcomes:
        seed = f"seed {outcome.seed}: " if len(outcomes) > 1 else ""
        print(f"done: {seed}{outcome.step} steps, MLflow run {outcome.run_id}, checkpoint {outcome.checkpoint}")
    if outcomes[0].group_run_id:
        print(f"group run {outcomes[0].group_run_id} (mvar.group {outcomes[0].group}): {len(outcomes)} seeds")
    return 0


def run_train_tokenizer(args: argparse.Namespace) -> int:
    set_verbose(args)
    _setup_logging()
    from mvar.training.launch import train_tokenizer
    from mvar.training.tasks import prepare_tokenizer
    from mvar.training.tokenizer_config import load_tokenizer_train_config
    cfg = load_tokenizer_train_config(args.config, args.overrides)
    if run_config(args, cfg, prepare_tokenizer, "shards, init_from, output, the perceptual weights"):
        return 0
    outcome, out = train_tokenizer(cfg, local=args.local)
    print(f"done: {outcome.step} steps, MLflow run {outcome.run_id}, checkpoint {outcome.checkpoint}")
    print(f"tokenizer: {out}")
    return 0
