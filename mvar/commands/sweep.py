"""`mvar sweep`: an Optuna study whose trials are training + evaluation runs on Ray.

    mvar sweep sweeps/k_depth.yaml [--storage URL] [--n-trials N] [--n-parallel N] [--check]
               [key.sub=value ...]          # base training config overrides, every trial
               [study.key=value ...]        # study file keys: study.eval.num_per_class=5

`python -m sweeps.run` is the same command. Rerunning it continues the study: finished trials are
kept, a trial whose process died is retried (heartbeats), the budget counts complete and pruned
trials. Everything in the study file is checked before the first trial starts (`--check` stops there).
"""
from __future__ import annotations

import argparse

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


def run(args: argparse.Namespace) -> int:
    set_verbose(args)  # the trials' training processes inherit it
    from sweeps.run import run_sweep
    return run_sweep(args)
