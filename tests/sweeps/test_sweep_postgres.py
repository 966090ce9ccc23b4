"""The tiny k x depth sweep on a real PostgreSQL server (127.0.0.1, started for this module, credentials only
in the environment): a trial end to end and a rerun that counts nothing twice, and a wrong password refused
before any trial. (Resume after a kill is tested on SQLite in test_sweep.py: the same heartbeat code.)"""
from __future__ import annotations

import optuna
import pytest

from mvar import tracking
from sweeps.run import main
from sweeps.storage import storage_url

pytestmark = [pytest.mark.slow]


@pytest.fixture
def pg_env(postgres, monkeypatch):
    monkeypatch.setenv("PGUSER", postgres.user)
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    return postgres


def test_wrong_password_is_refused_before_any_trial(pg_env, sweep_inputs, monkeypatch, capsys):
    monkeypatch.setenv("PGPASSWORD", "not-the-password")
    rc = main(["sweeps/k_depth_tiny.yaml", "--check", "--storage", pg_env.url, *sweep_inputs.args("pg")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--storage 'postgresql+psycopg2://127.0.0.1:{pg_env.port}/optuna' does not answer" in err
    assert "password authentication failed" in err and "not-the-password" not in err


@pytest.mark.usefixtures("local_ray")
def test_sweep_on_postgresql(pg_env, sweep_inputs):
    args = sweep_inputs.args("pg", **{"run.storage_path": str(sweep_inputs.root / "pg-runs")})
    for _ in range(2):  # the rerun finds the study complete and runs nothing
        assert main(["sweeps/k_depth_tiny.yaml", "--n-trials", "1", "--storage", pg_env.url, *args]) == 0
    study = optuna.load_study(study_name="pg", storage=storage_url(pg_env.url))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert len(study.trials[0].values) == 2 and study.trials[0].user_attrs["eval/fid"] == study.trials[0].values[0]
    c = tracking.client(sweep_inputs.tracking_uri)
    exp = c.get_experiment_by_name("sweeps").experiment_id
    [parent] = c.search_runs([exp], "tags.`mvar.study` = 'pg' and tags.`mvar.sweep` = 'parent'")
    assert parent.data.params["study.storage"] == f"postgresql+psycopg2://127.0.0.1:{pg_env.port}/optuna"
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [ch.data.tags["mvar.trial"] for ch in children] == ["0"]
    assert "eval/fid" in children[0].data.metrics and children[0].info.status == "FINISHED"
