"""The tracking interface against a real MLflow SQLite store (and a server that is not there)."""
from __future__ import annotations

import socket
import time

import pytest

from mvar import tracking
from mvar.errors import UserError
from mvar.tracking import MlflowTracker, TrackingConfig


@pytest.fixture()
def cfg(tmp_path):
    return TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t", system_metrics=False)


def test_run_holds_params_tags_metrics_and_artifacts(cfg, tmp_path):
    run_id = tracking.start_run(cfg, "r1", tags={"mvar.variant": "mvar"})
    t = MlflowTracker(run_id, cfg)
    t.log_params({"model": {"depth": 2, "attention": "mvar"}, "optim": {"lr": 1e-4}})
    for step in range(1, 4):
        t.log_metrics({"train/loss": 3.0 - step}, step)
    (tmp_path / "a.txt").write_text("hello")
    t.log_artifact(tmp_path / "a.txt", "files")
    t.log_text("x: 1\n", "config.yaml")
    t.close()
    c = tracking.client(cfg.uri)
    run = c.get_run(run_id)
    assert run.data.params["model.depth"] == "2" and run.data.params["optim.lr"] == "0.0001"
    assert run.data.tags["mvar.variant"] == "mvar" and run.data.tags["mvar.git_commit"]
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert tracking.last_logged_step(run_id, "train/loss", cfg.uri) == 3
    names = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "files")}
    assert {"config.yaml", "files/a.txt"} <= names
    # artifacts sit beside the database, not in the working directory
    assert str(tmp_path) in run.info.artifact_uri


def test_resumed_tracker_skips_steps_already_logged_per_key(cfg):
    run_id = tracking.start_run(cfg, "r2")
    first = MlflowTracker(run_id, cfg)
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 1.0}, step)
    first.log_metrics({"val/loss": 1.0}, 2)  # killed after train/loss of step 3, before its val/loss
    first.close(status="")
    assert tracking.logged_steps(run_id, cfg.uri) == {"train/loss": 3, "val/loss": 2}
    second = MlflowTracker(run_id, cfg, skip_logged=True)
    for step in (2, 3, 4, 5):
        second.log_metrics({"train/loss": 2.0}, step)
        second.log_metrics({"val/loss": 2.0}, step)
    second.close()
    history = tracking.client(cfg.uri).get_metric_history
    assert sorted(m.step for m in history(run_id, "train/loss")) == [1, 2, 3, 4, 5]
    assert sorted((m.step, m.value) for m in history(run_id, "val/loss")) == [(2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_gone_does_not_raise(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}", system_metrics=False, retry_s=1.0,
                         flush_timeout_s=20)
    t = MlflowTracker("0" * 32, cfg)
    start = time.monotonic()
    t.log_metrics({"train/loss": 1.0}, 1)  # returns at once: sending happens in the background
    assert time.monotonic() - start < 1.0
    t.close()
    assert t.failures >= 1


def test_flush_returns_once_everything_queued_is_sent_and_gives_up_after_its_timeout(cfg, monkeypatch):
    run_id = tracking.start_run(cfg, "r3")
    t = MlflowTracker(run_id, cfg)
    for step in range(1, 6):
        t.log_metrics({"train/loss": 1.0}, step)
    assert t.flush()
    assert tracking.last_logged_step(run_id, "train/loss", cfg.uri) == 5  # sent before flush returned
    t.close()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    gone = MlflowTracker("0" * 32, TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}", system_metrics=False,
                                                  retry_s=30.0, flush_timeout_s=1.0))
    gone.log_metrics({"train/loss": 1.0}, 1)
    start = time.monotonic()
    assert not gone.flush()  # the server is not there: a bounded wait, then training goes on
    assert time.monotonic() - start < 5.0
    gone.close()


def test_unreachable_store_is_a_clear_error_before_work(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match="does not answer"):
        tracking.start_run(cfg, "r")


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("sqlite:///x/m.db") == f"sqlite:///{tmp_path}/x/m.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri("") == f"sqlite:///{tmp_path}/out/mlflow/mlflow.db"
    with pytest.raises(UserError, match="no scheme"):
        tracking.resolve_uri("somewhere")
