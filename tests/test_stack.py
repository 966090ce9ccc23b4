"""`mvar stack up | status | down` end to end: a real Ray head, MLflow server and optuna-dashboard on free ports.

One stack serves the whole module (starting it costs ~30 s); the last test takes it down and the
fixture's finalizer takes it down again whatever happened, so no server outlives the tests.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mvar import stack
from mvar.cli import main

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (sockets held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def up_stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack") / "stack"
    ray_port, dash_port, mlflow_port, optuna_port = _free_ports(4)
    argv = ["stack", "up", "--dir", str(d), "--ray-port", str(ray_port), "--dashboard-port", str(dash_port),
            "--mlflow-port", str(mlflow_port), "--optuna-port", str(optuna_port),
            "--optuna-storage", f"sqlite:///{d.parent / 'optuna.db'}", "--num-cpus", "1", "--object-store-mb", "200"]
    try:
        assert main(argv) == 0
        yield d, argv
    finally:
        stack.down(d)
        spec = stack.load_spec(d)
        if spec is not None and spec.temp_dir.startswith("/tmp/mvar-ray-"):
            shutil.rmtree(spec.temp_dir, ignore_errors=True)  # Ray's session logs of this test head


def test_status_reports_every_service_running(up_stack, capsys):
    d, _ = up_stack
    capsys.readouterr()
    assert main(["stack", "status", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert out.count("running") == 3 and "not running" not in out and out.count("pid ") == 3


def test_optuna_dashboard_serves_the_sweeps_storage(up_stack):
    """optuna-dashboard answers on its port with its page and the studies of the storage it was given
    (a study made here after `up` shows: it reads the same SQLite file)."""
    import json

    import optuna
    d, _ = up_stack
    spec = stack.load_spec(d)
    assert spec.optuna_storage == f"sqlite:///{d.parent / 'optuna.db'}"
    assert stack.stack_env(d)["MVAR_OPTUNA_DASHBOARD_URL"] == spec.optuna_url
    assert f"MVAR_OPTUNA_DASHBOARD_URL={spec.optuna_url}" in (d / "env.sh").read_text()
    study = optuna.create_study(study_name="stack-test", storage=spec.optuna_storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with urllib.request.urlopen(spec.optuna_url + "/dashboard", timeout=20) as page:
        assert page.status == 200 and b"<html" in page.read().lower()
    with urllib.request.urlopen(spec.optuna_url + "/api/studies", timeout=20) as api:
        [listed] = [s for s in json.loads(api.read())["study_summaries"] if s["study_name"] == "stack-test"]
    with urllib.request.urlopen(f"{spec.optuna_url}/api/studies/{listed['study_id']}", timeout=20) as api:
        assert len(json.loads(api.read())["trials"]) == 2


def test_up_again_says_so(up_stack, capsys):
    _, argv = up_stack
    capsys.readouterr()
    assert main(argv) == 0
    assert "already up" in capsys.readouterr().out


def test_env_file_and_token_stay_private(up_stack):
    d, _ = up_stack
    spec = stack.load_spec(d)
    env = stack.stack_env(d)
    assert env["RAY_ADDRESS"] == f"http://127.0.0.1:{spec.dashboard_port}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{spec.mlflow_port}"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    env_sh = (d / "env.sh").read_text()
    assert token_file.read_text() not in env_sh  # the file path is exported, never the secret
    for key, value in env.items():
        assert f"export {key}={value}" in env_sh
    assert "RAY_AUTH_TOKEN" not in stack.stack_env(d, {"RAY_AUTH_TOKEN": "stale", "HOME": "/x"})


def test_jobs_api_refuses_requests_without_the_token(up_stack):
    spec = stack.load_spec(up_stack[0])
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(spec.dashboard_url + "/api/jobs/", timeout=10)
    assert err.value.code == 401


def test_every_server_listens_on_loopback_only(up_stack, listeners):
    spec = stack.load_spec(up_stack[0])
    procs = stack.head_processes(spec) + stack.mlflow_processes(spec.path) + stack.optuna_processes(spec.path)
    watch = listeners.Watch(lambda: [p.pid for p in procs])
    watch.sample()
    assert {port for _, _, port in watch.seen} >= {spec.ray_port, spec.dashboard_port, spec.mlflow_port,
                                                    spec.optuna_port}
    watch.assert_listeners_on("127.0.0.1", expect=("gcs_server", "raylet", "dashboard", "uvicorn"))


def test_mlflow_refuses_a_foreign_host_and_origin(up_stack):
    """MLflow 3's own checks stay on: a request naming another host (DNS rebinding) or a cross-site
    browser request gets 403 while the same request from here is served."""
    spec = stack.load_spec(up_stack[0])
    url = spec.mlflow_url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert stack._http_status(url) == 200
    assert stack._http_status(url, {"Host": "evil.example.com"}) == 403
    assert _post_status(spec.mlflow_url + "/api/2.0/mlflow/experiments/create",
                        {"Origin": "http://evil.example.com"}) == 403


def _post_status(url: str, headers: dict) -> int:
    req = urllib.request.Request(url, data=b'{"name": "x-origin"}', method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mlflow_server_logs_a_run(up_stack):
    import mlflow
    client = mlflow.MlflowClient(stack.stack_env(up_stack[0])["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment(f"stack-test-{time.time_ns()}")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "lr", "0.1")
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    client.set_terminated(run.info.run_id)
    fetched = client.get_run(run.info.run_id)
    assert fetched.data.metrics["loss"] == 0.5 and fetched.data.params["lr"] == "0.1"
    assert fetched.info.status == "FINISHED"


def test_ray_job_submit_runs_and_logs(up_stack):
    d, _ = up_stack
    env = stack.stack_env(d, os.environ)
    submit = subprocess.run([RAY, "job", "submit", "--address", env["RAY_ADDRESS"], "--",
                             "python", "-c", "print('hello-from-job')"],
                            env=env, capture_output=True, text=True, timeout=180, check=False)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    assert "hello-from-job" in submit.stdout + submit.stderr
    assert "succeeded" in submit.stdout + submit.stderr


def test_a_driver_connects_to_the_gcs_with_the_stack_env(up_stack, tmp_path):
    d, _ = up_stack
    spec = stack.load_spec(d)
    env = {**stack.stack_env(d, os.environ), "RAY_ADDRESS": f"127.0.0.1:{spec.ray_port}"}
    code = "import ray; ray.init(); print('answer', ray.get(ray.remote(lambda: 42).remote()))"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0 and "answer 42" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def _wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    import psutil
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.2)
    raise AssertionError(f"pid {pid} still alive after {timeout_s} s")


def test_a_killed_mlflow_parent_leaves_a_server_the_stack_still_owns(up_stack, capsys):
    """`mlflow server` is a parent with a uvicorn child that serves the port: with the parent SIGKILLed the
    child keeps serving; the stack still owns it (status running, up does not refuse its port, down stops it:
    test_down_stops_only_this_stack)."""
    d, argv = up_stack
    spec = stack.load_spec(d)
    parent = int((d / "mlflow.pid").read_text())
    os.kill(parent, signal.SIGKILL)
    _wait_gone(parent)
    [mlflow] = [s for s in stack.status(d) if s.name == "mlflow"]
    assert mlflow.running and mlflow.pid not in (None, parent), mlflow
    assert f"parent pid {parent}" in mlflow.note
    capsys.readouterr()
    assert main(["stack", "status", "--dir", str(d)]) == 0
    assert main(argv) == 0
    assert "already up" in capsys.readouterr().out
    assert stack._mlflow_answers(spec)


def test_a_killed_gcs_leaves_processes_that_up_cleans_up(up_stack, capsys):
    """The GCS SIGKILLed: raylet, dashboard and agents of the head linger (and hold its ports) for a while;
    status says not running, and `up` ends them before it starts a new head on the same ports."""
    d, argv = up_stack
    spec = stack.load_spec(d)
    gcs = [p for p in stack.head_processes(spec) if stack._proc_name(p) == "gcs_server"]
    assert len(gcs) == 1
    before = {p.pid for p in stack.head_processes(spec)}
    gcs[0].kill()
    _wait_gone(gcs[0].pid)
    [ray] = [s for s in stack.status(d) if s.name == "ray"]
    assert not ray.running
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "started: ray" in out and "mlflow" not in out.split("started:")[1].split(")")[0]
    assert not before & {p.pid for p in stack.head_processes(stack.load_spec(d))}, "an old head process survived"
    assert all(s.running for s in stack.status(d))


def test_down_stops_only_this_stack(up_stack, capsys):
    d, _ = up_stack
    spec = stack.load_spec(d)
    mlflow_procs = stack.mlflow_processes(spec.path)  # after test_a_killed_mlflow_parent_...: the orphan only
    assert mlflow_procs
    # a stand-in for someone else's Ray head: a process whose command line looks like one
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "gcs_server",
                              "--temp-dir=/tmp/ray", "--port=6379"], start_new_session=True)
    try:
        assert main(["stack", "down", "--dir", str(d)]) == 0
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert stack.head_processes(spec) == [] and stack.mlflow_processes(spec.path) == []
    assert stack.optuna_processes(spec.path) == []
    assert not any(p.is_running() and p.status() != "zombie" for p in mlflow_procs)
    assert not any((d / f).exists() for f in ("mlflow.pid", "ray.pid", "optuna-dashboard.pid"))
    capsys.readouterr()
    assert main(["stack", "status", "--dir", str(d)]) == 1
    assert capsys.readouterr().out.count("not running") == 3
    for port in (spec.ray_port, spec.dashboard_port, spec.mlflow_port, spec.optuna_port):
        assert not stack.port_in_use(port), port
    assert main(["stack", "down", "--dir", str(d)]) == 0  # idempotent


def test_up_refuses_an_occupied_mlflow_port(tmp_path, capsys):
    ray_port, dash_port, optuna_port = _free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc = main(["stack", "up", "--dir", str(tmp_path / "s"), "--ray-port", str(ray_port),
                   "--dashboard-port", str(dash_port), "--mlflow-port", str(port), "--optuna-port", str(optuna_port),
                   "--optuna-storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "MLflow" in err and "--mlflow-port" in err
    assert not (tmp_path / "s" / "stack.json").exists()  # nothing was started
