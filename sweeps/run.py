"""`python -m sweeps.run STUDY.yaml ...`: the same command as `mvar sweep` (its --help and flags:
mvar/commands/sweep.py); here: the study file, the storage and the checks before a study runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from mvar.commands import run_cli, standalone
from mvar.commands.sweep import DESCRIPTION, configure
from sweeps.checks import Preflight, preflight
from sweeps.storage import masked, open_storage, storage_url
from sweeps.study import StudyConfig, load_study

log = logging.getLogger("sweeps")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(study-file overrides, base-config overrides): `study.` picks the study file."""
    study = [i[len("study."):] for i in items if i.startswith("study.")]
    return study, [i for i in items if not i.startswith("study.")]


def keep_loopback() -> None:
    """A loopback RAY_ADDRESS must stay loopback (Ray turns it into the machine's address otherwise)."""
    address = os.environ.get("RAY_ADDRESS", "")
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def study_overrides(args: argparse.Namespace) -> list[str]:
    """The study file's overrides: `study.key=value` items, then the flags that are their shorthands."""
    items = split_overrides(args.overrides)[0]
    for flag, key in ((args.n_trials, "n_trials"), (args.n_parallel, "n_parallel")):
        if flag is not None:
            items.append(f"{key}={flag}")
    return items


@dataclass
class Prepared:
    study: StudyConfig
    pre: Preflight
    url: str
    storage: object      # optuna's RDBStorage


def prepare(args: argparse.Namespace) -> Prepared:
    """The study file, the storage, every check on the inputs: all before anything runs."""
    study = load_study(args.study, study_overrides(args))
    url = storage_url(args.storage, study.storage)
    storage = open_storage(url, study.resume)
    return Prepared(study, preflight(study, split_overrides(args.overrides)[1]), url, storage)


def run_sweep(args: argparse.Namespace) -> int:
    """Check everything, then run the study (or stop after the checks: --check, --print-config)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    keep_loopback()
    if args.print_config:
        from mvar.config import dump_yaml
        print(dump_yaml(load_study(args.study, study_overrides(args))), end="")
        return 0
    prep = prepare(args)
    if args.check:
        print(f"OK: {args.study}: {len(prep.study.search_space)} keys searched, storage {masked(prep.url)}")
        return 0
    from sweeps.driver import run_study
    try:
        return run_study(prep.study, prep.pre, prep.url, prep.storage)
    except KeyboardInterrupt:
        print("sweeps.run: interrupted; rerun the same command to continue (interrupted trials are retried)",
              file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m sweeps.run", DESCRIPTION, configure), argv, name="sweeps.run")


if __name__ == "__main__":
    sys.exit(main())
