"""Run tracking behind one small interface; MLflow is the implementation.

Workflows log through a ``Tracker``: ``log_params``, ``set_tags``,
``log_metrics(metrics, step)``, ``log_artifact``, ``log_text``, ``close``.
Rank 0 gets an ``MlflowTracker`` bound to one run id; other ranks get a
``NullTracker``. Metrics and artifacts are sent by a background thread that
retries, so a tracking server that goes away mid-run costs log lines, not the
training job; what is still queued when the run closes is flushed with a
bounded wait.

Where runs go (``TrackingConfig.uri``, else ``MLFLOW_TRACKING_URI``, else a
SQLite store under ``out/mlflow`` of the working directory). For a SQLite
store the experiment's artifacts live beside the database, never in the
working directory (which a Ray job deletes with its session).
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvar.config import check, flatten
from mvar.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_STORE = "out/mlflow"


@dataclass
class TrackingConfig:
    uri: str = ""                 # '' = MLFLOW_TRACKING_URI, else sqlite under out/mlflow
    experiment: str = "mvar"
    run_name: str = ""            # '' = the training run's name
    system_metrics: bool = True   # MLflow's CPU/GPU/memory sampler on rank 0
    system_metrics_interval_s: float = 10.0
    retry_s: float = 600.0        # how long queued metrics wait for a server that went away
    flush_timeout_s: float = 60.0  # how long close() waits for the queue to drain

    def validate(self, prefix: str = "") -> None:
        check(bool(self.experiment), prefix + "experiment", "must not be empty")
        check(self.system_metrics_interval_s > 0, prefix + "system_metrics_interval_s", "must be > 0")
        check(self.retry_s >= 0, prefix + "retry_s", "must be >= 0")


def resolve_uri(uri: str = "") -> str:
    """An absolute tracking URI that every process of the run (and a Ray job) shares."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        store = Path(DEFAULT_STORE).resolve()
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()  # relative sqlite path -> absolute
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:
        raise UserError(f"tracking URI '{uri}' has no scheme; use http://HOST:PORT or sqlite:////ABS/PATH.db")
    return uri


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store: an absolute artifact folder beside the database."""
    if uri.startswith("sqlite:///"):
        return "file://" + str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def client(uri: str = ""):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=resolve_uri(uri))


def experiment_id(name: str, uri: str = "") -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if missing."""
    uri = resolve_uri(uri)
    c = client(uri)
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        root = _artifact_root(uri)
        # the kind makes MLflow 3's UI open the experiment on its runs (not the GenAI overview)
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                   tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception as err:
        if type(err).__name__ == "RestException" and "RESOURCE_ALREADY_EXISTS" in str(err):
            return c.get_experiment_by_name(name).experiment_id  # created concurrently
        raise UserError(f"MLflow tracking store '{uri}' does not answer ({type(err).__name__}: {err}); "
                        "start it (`mvar stack up`) or set tracking.uri / MLFLOW_TRACKING_URI") from err


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's commit (with '-dirty' when files differ), or 'unknown' outside git."""
    cwd = cwd or Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return os.environ.get("MVAR_GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MVAR_GIT_COMMIT", "unknown")


def start_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a run and return its id (the driver does this once; workers attach by id)."""
    uri = resolve_uri(cfg.uri)
    exp = experiment_id(cfg.experiment, uri)
    all_tags = {"mvar.git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(exp, run_name=cfg.run_name or run_name, tags=all_tags)
    return run.info.run_id


def run_exists(run_id: str, uri: str = "") -> bool:
    try:
        client(uri).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - deleted, unknown or unreachable: start afresh
        return False


def last_logged_step(run_id: str, key: str, uri: str = "") -> int:
    """Highest step logged for ``key`` (-1 if none)."""
    history = client(uri).get_metric_history(run_id, key)
    return max((m.step for m in history), default=-1)


def logged_steps(run_id: str, uri: str = "") -> dict[str, int]:
    """Highest step logged per metric key of a run (system metrics aside): what a resumed run must not log again.

    Per key, because a run killed mid-step can have logged ``train/loss`` for a step but not the ``val/loss``
    that follows it; the resumed run recomputes that step and must still log the missing key."""
    c = client(uri)
    keys = [k for k in c.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: last_logged_step(run_id, k, uri) for k in keys}


class NullTracker:
    """What ranks other than 0 (and dry runs) log to."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def flush(self, timeout_s: float | None = None) -> bool: return True
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(NullTracker):
    """Logs to an existing MLflow run from a background thread that retries failures."""

    def __init__(self, run_id: str, cfg: TrackingConfig, skip_logged: bool = False):
        from mlflow import MlflowClient
        self.run_id, self.cfg = run_id, cfg
        self.uri = resolve_uri(cfg.uri)
        self._client = MlflowClient(tracking_uri=self.uri)
        # a resumed run: per key, the steps already logged are not logged again
        self._logged = logged_steps(run_id, self.uri) if skip_logged else {}
        self._queue: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="mvar-tracking", daemon=True)
        self._thread.start()
        self._monitor = None
        self.failures = 0

    # -- the interface -------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            chunk = items[i:i + 100]
            self._submit(lambda c=chunk: self._client.log_batch(self.run_id, params=c))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._submit(lambda: self._client.log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._logged.get(k, -1)]
        if not items:
            return
        self._submit(lambda: self._client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self._submit(lambda: self._client.log_artifact(self.run_id, str(path), artifact_dir))

    def log_text(self, text: str, name: str) -> None:
        self._submit(lambda: self._client.log_text(self.run_id, text, name))

    def start_system_metrics(self) -> None:
        """MLflow's sampler of CPU, memory (and GPU with nvidia-ml-py) into this run."""
        if not self.cfg.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                                 resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - system metrics are a convenience, never fatal
            log.warning("system metrics not started: %s", err)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is sent (at most ``timeout_s``, default flush_timeout_s)."""
        sent = threading.Event()
        self._submit(sent.set)
        if sent.wait(self.cfg.flush_timeout_s if timeout_s is None else timeout_s):
            return True
        log.warning("tracking: %d operations still queued; going on without waiting", self._queue.qsize())
        return False

    def close(self, status: str = "FINISHED") -> None:
        """Flush the queue (bounded wait), stop the sampler, and mark the run ``status`` (or leave it)."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as err:  # noqa: BLE001
                log.warning("system metrics did not stop cleanly: %s", err)
        if status:
            self._submit(lambda: self._client.set_terminated(self.run_id, status))
        self._queue.put(None)
        self._thread.join(self.cfg.flush_timeout_s)
        if self._thread.is_alive():
            log.warning("tracking: %d operations still queued after %.0f s; giving up on them",
                        self._queue.qsize(), self.cfg.flush_timeout_s)

    # -- background sending -------------------------------------------------
    def _submit(self, op: Callable[[], Any]) -> None:
        self._queue.put(op)

    def _drain(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            self._send(op)

    def _send(self, op: Callable[[], Any]) -> None:
        deadline, delay = time.monotonic() + self.cfg.retry_s, 1.0
        while True:
            try:
                op()
                return
            except Exception as err:  # noqa: BLE001 - the server may be down; training goes on
                self.failures += 1
                if time.monotonic() >= deadline:
                    log.error("tracking: dropped one operation after %.0f s of failures: %s", self.cfg.retry_s, err)
                    return
                log.warning("tracking: MLflow call failed (%s: %s); retrying in %.0f s",
                            type(err).__name__, str(err)[:200], delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)


def _param_value(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param value limit
