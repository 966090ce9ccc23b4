"""`mvar sweep`: an Optuna study whose trials are training + evaluation runs on Ray.

    mvar sweep sweeps/k_depth.yaml [--storage URL] [--n-trials N] [--n-parallel N] [--check]
               [key.sub=value ...]          # base training config overrides, every trial
               [study.key=value ...]        # study file keys: study.eval.num_per_class=5

`python -m sweeps.run` is the same command. Rerunning it continues the study: finished trials are
kept, a trial whose process died is retried (heartbeats), the budget counts complete and pruned
trials. Everything in the study file is checked before the first trial starts (`--check` stops there):
here the study file, the storage and those checks; the study itself is `sweeps.driver.run_study`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from mvar.commands import add_config_arguments, add_verbose_argument, set_verbose

DESCRIPTION = "Run an Optuna study whose trials are training + evaluation runs on Ray."


def register(subparsers) -> None:
    configure(subparsers.add_parser("sweep", help="an Optuna study of training + evaluation runs (Ray)",
                                    description=DESCRIPTION))


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study file (sweeps/*.yaml)")
    p.add_argument("--storage", default="", help="Optuna storage URL (default: MVAR_OPTUNA_STORAGE, the study "
                   "file's, else sqlite:///out/optuna/optuna.db); PostgreSQL: postgresql://HOST:PORT/DB with "
                   "PGUSER/PGPASSWORD in the environment")
    p.add_argument("--n-trials", type=int, help="shorthand of study.n_trials: finished trials the study should "
                   "end with (default: the study file's)")
    p.add_argument("--n-parallel", type=int, help="shorthand of study.n_parallel: trials at once, 0 = what Ray "
                   "fits (default: the study file's)")
    add_config_arguments(p, "", overrides_help="key.sub=value for the base training config of every trial; "
                         "study.key=value for the study file (anywhere on the line)",
                         check_help="check the study file, its inputs and the storage, print OK, run nothing")
    add_verbose_argument(p)
    p.set_defaults(func=run)


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
    study: object        # sweeps.study.StudyConfig
    pre: object          # sweeps.checks.Preflight
    url: str
    storage: object      # optuna's RDBStorage


def prepare(args: argparse.Namespace) -> Prepared:
    """The study file, the storage, every check on the inputs: all before anything runs."""
    from sweeps.checks import preflight
    from sweeps.storage import open_storage, storage_url
    from sweeps.study import load_study
    study = load_study(args.study, study_overrides(args))
    url = storage_url(args.storage, study.storage)
    storage = open_storage(url, study.resume)
    return Prepared(study, preflight(study, split_overrides(args.overrides)[1]), url, storage)


def run(args: argparse.Namespace) -> int:
    """Check everything, then run the study (or stop after the checks: --check, --print-config)."""
    set_verbose(args)  # the trials' training processes inherit it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    keep_loopback()
    if args.print_config:
        from mvar.config import dump_yaml
        from sweeps.study import load_study
        print(dump_yaml(load_study(args.study, study_overrides(args))), end="")
        return 0
    prep = prepare(args)
    if args.check:
        from sweeps.storage import masked
        print(f"OK: {args.study}: {len(prep.study.search_space)} keys searched, storage {masked(prep.url)}")
        return 0
    from sweeps.driver import run_study
    try:
        return run_study(prep.study, prep.pre, prep.url, prep.storage)
    except KeyboardInterrupt:
        print("sweeps.run: interrupted; rerun the same command to continue (interrupted trials are retried)",
              file=sys.stderr)
        return 130
