"""Run an Optuna study whose trials are training + evaluation runs on Ray.

    python -m sweeps.run sweeps/k_depth.yaml [--storage URL] [--n-trials N] [--n-parallel N] [--check]
                         [key.sub=value ...]          # base training config overrides, every trial
                         [study.key=value ...]        # study file keys: study.eval.num_per_class=5

Rerunning the same command continues the study: finished trials are kept, a trial whose
process died is retried (heartbeats), the budget counts complete and pruned trials.
Everything in the study file is checked before the first trial starts (`--check` stops there).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from mvar.config import ConfigError
from mvar.errors import UserError
from sweeps.checks import Preflight, preflight
from sweeps.storage import masked, open_storage, storage_url
from sweeps.study import StudyConfig, load_study

log = logging.getLogger("sweeps")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.splitlines()[0])
    p.add_argument("study", help="study file (sweeps/*.yaml)")
    p.add_argument("--storage", default="", help="Optuna storage URL (default: MVAR_OPTUNA_STORAGE, the study "
                   "file's, else sqlite:///out/optuna/optuna.db); PostgreSQL: postgresql://HOST:PORT/DB with "
                   "PGUSER/PGPASSWORD in the environment")
    p.add_argument("--n-trials", type=int, help="finished trials the study should end with (the file's n_trials)")
    p.add_argument("--n-parallel", type=int, help="trials at once (the file's n_parallel; 0 = what Ray fits)")
    p.add_argument("--check", action="store_true", help="check the study file, its inputs and the storage; run nothing")
    p.add_argument("--verbose", action="store_true",
                   help="also Ray's own INFO/WARNING messages, in the sweep and its trials (MVAR_VERBOSE=1)")
    p.add_argument("overrides", nargs="*", help="key.sub=value for the base training config; study.key=value "
                   "for the study file")
    return p.parse_intermixed_args(argv)


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


@dataclass
class Prepared:
    study: StudyConfig
    pre: Preflight
    url: str
    storage: object      # optuna's RDBStorage


def prepare(args: argparse.Namespace) -> Prepared:
    """The study file, the storage, every check on the inputs: all before anything runs."""
    study_items, base_items = split_overrides(args.overrides)
    for flag, key in ((args.n_trials, "n_trials"), (args.n_parallel, "n_parallel")):
        if flag is not None:
            study_items.append(f"{key}={flag}")
    study = load_study(args.study, study_items)
    url = storage_url(args.storage, study.storage)
    storage = open_storage(url, study.resume)
    return Prepared(study, preflight(study, base_items), url, storage)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mvar import cluster
    cluster.set_verbose(args.verbose)  # in the environment: the trials' training processes inherit it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    keep_loopback()
    try:
        prep = prepare(args)
        if args.check:
            print(f"{args.study}: ok ({len(prep.study.search_space)} keys searched, storage "
                  f"{masked(prep.url)})")
            return 0
        from sweeps.driver import run_study
        return run_study(prep.study, prep.pre, prep.url, prep.storage)
    except (ConfigError, UserError) as err:
        print(f"sweeps.run: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweeps.run: interrupted; rerun the same command to continue (interrupted trials are retried)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
