"""The cluster's PostgreSQL set-up, for real on a throwaway server on 127.0.0.1.

- `infra/cluster/postgres/init-databases.sh` makes the `mlflow` and `optuna` databases and users with
  passwords taken from the environment (any characters), again without harm, and refuses to start
  without them; each user reaches only its own database.
- The MLflow server starts from the environment of `infra/cluster/mlflow/mlflow.yaml`
  (MLFLOW_BACKEND_STORE_URI with no password in it, PGPASSWORD, MLFLOW_ARTIFACTS_DESTINATION),
  stores a run in PostgreSQL and proxies its artifact to the destination.
- Optuna runs a study on the `optuna` database with the storage URL of infra/README.md and PGPASSWORD.

Needs PostgreSQL's server programs (initdb, pg_ctl: Debian's postgresql package) and, for MLflow
and Optuna, psycopg2; skipped with the reason when they are missing.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
INIT_SCRIPT = REPO / "infra" / "cluster" / "postgres" / "init-databases.sh"
MLFLOW_MANIFEST = REPO / "infra" / "cluster" / "mlflow" / "mlflow.yaml"
# passwords with quotes, a backslash and spaces: the script must pass them through untouched
PASSWORDS = {"MLFLOW_DB_PASSWORD": "it's a \"test\" \\ pw", "OPTUNA_DB_PASSWORD": "optuna-test-only"}


def pg_program(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Server:
    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port

    def env(self, **extra: str) -> dict[str, str]:
        """A client environment for the superuser over the server's socket."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return {**base, "PGHOST": str(self.root), "PGPORT": str(self.port), "PGUSER": "postgres", **extra}

    def psql_as(self, user: str, password: str, database: str, sql: str) -> subprocess.CompletedProcess:
        """psql over TCP on 127.0.0.1 with a password, as a client on another machine would connect."""
        env = self.env(PGHOST="127.0.0.1", PGUSER=user, PGPASSWORD=password, PGDATABASE=database)
        return subprocess.run(["psql", "-X", "-tA", "-c", sql], env=env, capture_output=True, text=True, timeout=60,
                              check=False)


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = pg_program("initdb"), pg_program("pg_ctl")
    if not (initdb and pg_ctl and shutil.which("psql")):
        pytest.skip("PostgreSQL server programs not found (initdb, pg_ctl, psql: apt-get install postgresql)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: PostgreSQL will not start as root")
    root = Path(tempfile.mkdtemp(prefix="mvar-pg-"))  # short: the socket path must stay < 107 bytes
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = free_port()
    data = root / "data"
    subprocess.run(as_server_user([initdb, "-D", str(data), "-U", "postgres", "--auth-local=trust",
                                   "--auth-host=scram-sha-256"]), check=True, capture_output=True, timeout=120)
    opts = f"-k {root} -c listen_addresses=127.0.0.1 -p {port}"
    subprocess.run(as_server_user([pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-o", opts, "-w", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        yield Server(root, port)
    finally:
        subprocess.run(as_server_user([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True,
                       timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)


def run_init(server: Server, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INIT_SCRIPT)], env=server.env(**env), capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def initialized(postgres) -> Server:
    first = run_init(postgres, **PASSWORDS)
    assert first.returncode == 0, first.stderr
    return postgres


def test_init_script_makes_each_user_its_own_database(initialized):
    server = initialized
    assert server.psql_as("mlflow", PASSWORDS["MLFLOW_DB_PASSWORD"], "mlflow", "select current_user").stdout.strip() == "mlflow"
    assert server.psql_as("optuna", PASSWORDS["OPTUNA_DB_PASSWORD"], "optuna", "create table t (x int)").returncode == 0
    assert "permission denied" in server.psql_as("optuna", PASSWORDS["OPTUNA_DB_PASSWORD"], "mlflow", "select 1").stderr
    assert "password authentication failed" in server.psql_as("optuna", "wrong", "optuna", "select 1").stderr


def test_init_script_runs_again_and_refuses_missing_passwords(initialized):
    server = initialized
    again = run_init(server, **PASSWORDS)
    assert again.returncode == 0, again.stderr
    assert server.psql_as("optuna", PASSWORDS["OPTUNA_DB_PASSWORD"], "optuna", "select count(*) from t").stdout.strip() == "0"
    for missing in PASSWORDS:
        result = run_init(server, **{k: v for k, v in PASSWORDS.items() if k != missing})
        assert result.returncode != 0 and missing in result.stderr


def manifest_env(name: str) -> str:
    deployment = next(d for d in yaml.safe_load_all(MLFLOW_MANIFEST.read_text()) if d["kind"] == "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return next(e["value"] for e in env if e["name"] == name)


def wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow server did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its worker), SIGKILL after 15 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def test_mlflow_server_on_postgres_from_the_manifest_environment(initialized, tmp_path):
    pytest.importorskip("psycopg2", reason="psycopg2 (pip install psycopg2-binary) is MLflow's PostgreSQL driver here")
    from mlflow import MlflowClient
    uri = manifest_env("MLFLOW_BACKEND_STORE_URI")
    assert "@postgres:5432/" in uri and ":" not in uri.split("://")[1].split("@")[0], "the URI holds no password"
    port = free_port()
    env = {**initialized.env(), "MLFLOW_BACKEND_STORE_URI": uri.replace("@postgres:5432/", f"@127.0.0.1:{initialized.port}/"),
           "PGPASSWORD": PASSWORDS["MLFLOW_DB_PASSWORD"], "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "bucket"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "mlflow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, proc, log)
        client = MlflowClient(tracking_uri=url)
        run = client.create_run(client.create_experiment("pg-test"), run_name="mvar-tiny")
        client.log_metric(run.info.run_id, "eval/fid", 37.5)
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert client.get_run(run.info.run_id).data.metrics == {"eval/fid": 37.5}
        assert list((tmp_path / "bucket").rglob("note.txt")), "the artifact did not reach MLFLOW_ARTIFACTS_DESTINATION"
        rows = initialized.psql_as("mlflow", PASSWORDS["MLFLOW_DB_PASSWORD"], "mlflow",
                                   "select key, value from metrics").stdout
        assert "eval/fid|37.5" in rows, "the metric is not stored in PostgreSQL"
    finally:
        stop_group(proc)


def test_optuna_study_on_postgres_with_pgpassword(initialized, monkeypatch):
    pytest.importorskip("psycopg2", reason="psycopg2 (pip install psycopg2-binary) is Optuna's PostgreSQL driver here")
    import optuna
    monkeypatch.setenv("PGPASSWORD", PASSWORDS["OPTUNA_DB_PASSWORD"])  # libpq reads it: the URL holds none
    storage = f"postgresql+psycopg2://optuna@127.0.0.1:{initialized.port}/optuna"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="k-depth-test", storage=storage, load_if_exists=True)
    study.optimize(lambda t: (t.suggest_int("window", 1, 9) - 5) ** 2, n_trials=3)
    again = optuna.load_study(study_name="k-depth-test", storage=storage)
    assert len(again.trials) == 3
