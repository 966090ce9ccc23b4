"""Where the Optuna study lives: SQLite in the project by default, PostgreSQL at scale.

    --storage URL  >  MVAR_OPTUNA_STORAGE  >  the study file's `storage`  >  sqlite:///out/optuna/optuna.db

PostgreSQL credentials come from the environment, never from files in the repo: either the
whole URL in MVAR_OPTUNA_STORAGE, or `postgresql+psycopg2://USER@HOST:PORT/DB` with libpq's
PGPASSWORD (and PGUSER, or ~/.pgpass); a plain `postgresql://` URL gets the psycopg2 driver. Every storage gets heartbeats, so a trial whose process died is
marked FAIL after the grace period and queued again with the same parameters.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from mvar.errors import UserError
from sweeps.study import ResumeConfig

ENV_STORAGE = "MVAR_OPTUNA_STORAGE"
DEFAULT_STORAGE = "out/optuna/optuna.db"
CONNECT_TIMEOUT_S = 10


def storage_url(flag: str = "", configured: str = "") -> str:
    """The storage URL to use, a relative SQLite path made absolute (workers and reruns share it)."""
    url = flag or os.environ.get(ENV_STORAGE, "") or configured
    if not url:
        path = Path(DEFAULT_STORAGE).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = Path(url[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    for plain in ("postgresql://", "postgres://"):  # SQLAlchemy 2.1 would pick psycopg 3: use the project's driver
        if url.startswith(plain):
            return "postgresql+psycopg2://" + url[len(plain):]
    return url


def masked(url: str) -> str:
    """The URL with its password hidden, fit for logs and MLflow params."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a database URL: nothing to hide but keep it short
        return url.split("@")[-1]


def _engine_kwargs(url: str) -> dict:
    if url.startswith(("postgresql", "mysql")):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    return {}


@contextlib.contextmanager
def quiet_experimental():
    """Optuna warns that heartbeats and retries are experimental at every use: the docs say it once."""
    from optuna.exceptions import ExperimentalWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


def open_storage(url: str, resume: ResumeConfig):
    """An RDBStorage with heartbeats and retries, or a UserError naming --storage when it does not answer."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    shown = masked(url)
    if "://" not in url:
        raise UserError(f"--storage '{shown}' is not a database URL; use sqlite:////ABS/PATH.db or "
                        f"postgresql://HOST:PORT/DB")
    try:
        with quiet_experimental():
            return RDBStorage(url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=resume.heartbeat_interval_s,
                              grace_period=resume.grace_period_s,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=resume.max_retry))
    except ModuleNotFoundError as err:
        raise UserError(f"--storage '{shown}': the database driver is missing ({err}); for PostgreSQL "
                        f"`pip install psycopg2-binary`") from err
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--storage '{shown}' does not answer ({type(err).__name__}: {first}); start the "
                        f"database, check the URL and the credentials (PGUSER/PGPASSWORD or "
                        f"{ENV_STORAGE}), or pass another --storage") from err
