"""Inputs of the sweep tests: a stand-in tiny tokenizer, token shards, Inception stand-in weights and a
reference; a local Ray; and a real PostgreSQL server on 127.0.0.1 (installed from Debian's packages
when missing), started for the module that asks for it and stopped afterwards."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mvar import tracking
from mvar.checkpoint import save_tokenizer
from mvar.data.synth import write_synth
from mvar.data.tokens import tokenize
from mvar.metrics.fidelity import compute_reference, save_reference
from mvar.metrics.inception import resolve_weights, write_standin_inception_weights
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT = "sweeps"


@dataclass
class SweepInputs:
    root: Path
    tokenizer: str
    tokens: str
    eval_tokens: str
    weights: str
    reference: str

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.root}/optuna.db"

    def args(self, study_name: str, **extra) -> list[str]:
        """`sweeps.run` overrides: the base config onto these inputs (tiny, short runs), the study's
        evaluation onto the stand-in weights, logs and stores under ``root``."""
        base = {"tokenizer": self.tokenizer, "data.shards": self.tokens, "data.eval_shards": self.eval_tokens,
                "data.batch_size": 8, "run.storage_path": str(self.root / "runs"), "run.steps": 6,
                "run.checkpoint_every": 3, "run.log_every": 1, "tracking.uri": self.tracking_uri,
                "tracking.experiment": EXPERIMENT, "tracking.system_metrics": "false",
                "study.study_name": study_name, "study.log_dir": str(self.root / "sweeps"),
                "study.eval.reference": self.reference, "study.eval.feature_extractor": "inception",
                "study.eval.feature_extractor_weights": self.weights,
                "study.eval.num_per_class": 2, "study.eval.batch_size": 10, "study.eval.samples_per_shard": 10,
                "study.eval.isc_splits": 2, "study.eval.out_dir": str(self.root / "eval"),
                "study.eval.num_workers": 0,  # sample in the sweep's process: no Ray task start per trial
                "study.resume.heartbeat_interval_s": 2, "study.resume.grace_period_s": 6, "study.poll_s": 1}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def sweep_inputs(tmp_path_factory) -> SweepInputs:
    root = tmp_path_factory.mktemp("sweeps")
    torch.manual_seed(0)
    cfg = TokenizerConfig.tiny()
    save_tokenizer(root / "tokenizer", MultiScaleVQVAE(cfg), cfg)
    write_synth(str(root / "images"), num_images=80, image_size=64, num_classes=10, seed=0, shard_size=40)
    write_synth(str(root / "eval-images"), num_images=20, image_size=64, num_classes=10, seed=1, shard_size=10)
    tokenize(str(root / "tokenizer"), str(root / "images"), str(root / "tokens"), progress=False)
    tokenize(str(root / "tokenizer"), str(root / "eval-images"), str(root / "eval-tokens"), progress=False)
    weights = str(root / "inception-standin.pt")
    write_standin_inception_weights(weights, seed=0)
    reference = str(root / "reference.npz")
    save_reference(reference, compute_reference(str(root / "eval-images"), resolve_weights(weights),
                                                torch.device("cpu"), 10))
    inputs = SweepInputs(root, str(root / "tokenizer"), str(root / "tokens"), str(root / "eval-tokens"), weights,
                         reference)
    tracking.experiment_id(EXPERIMENT, inputs.tracking_uri)  # the store exists before tests poll it beside a sweep
    return inputs


@pytest.fixture(scope="module")
def local_ray(listeners):
    """One local Ray (127.0.0.1, 2 CPUs) for the module; sweeps run in a subprocess join it.

    The listening sockets of this process and all below it (the Ray, sweep drivers, their trials'
    training workers and evaluation) are sampled while the module runs: all must be on 127.0.0.1.
    """
    from mvar import cluster
    cluster.connect(num_cpus=2)
    try:
        with listeners.of_descendants() as watch:
            yield watch
    finally:
        cluster.shutdown()
    watch.assert_listeners_on("127.0.0.1")


# -- PostgreSQL --------------------------------------------------------------------------

@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        """No credentials in the URL: they come from PGUSER / PGPASSWORD."""
        return f"postgresql://{self.host}:{self.port}/{self.database}"


def _pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _install_postgres() -> Path:
    if not shutil.which("apt-get"):
        pytest.skip("PostgreSQL is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    if subprocess.run(install, check=False, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, check=False, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"apt-get install postgresql failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    bindir = _pg_bindir()
    assert bindir is not None, "postgresql installed but no /usr/lib/postgresql/*/bin/initdb"
    return bindir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the package's `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _start_postgres(bindir: Path, root: Path, port: int) -> subprocess.Popen:
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    subprocess.run(_as_server_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                                    "--auth-host=scram-sha-256", "-E", "UTF8"]), check=True, capture_output=True)
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(_as_server_user([str(bindir / "postgres"), "-D", str(data), "-k", str(sock),
                                                   "-h", "127.0.0.1", "-p", str(port)]),
                                  stdout=log, stderr=subprocess.STDOUT)
    for _ in range(120):
        ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], check=False,
                               capture_output=True)
        if ready.returncode == 0:
            return server
        assert server.poll() is None, (root / "server.log").read_text()
        time.sleep(0.5)
    server.terminate()
    raise AssertionError(f"PostgreSQL did not start: {(root / 'server.log').read_text()[-2000:]}")


@pytest.fixture(scope="module")
def postgres() -> Postgres:
    bindir = _pg_bindir() or _install_postgres()
    root = Path(tempfile.mkdtemp(prefix="mvar-pg-"))  # not under pytest's root-only temp dir
    port = _free_port()
    server = _start_postgres(bindir, root, port)
    pg = Postgres("127.0.0.1", port, "sweeper", secrets.token_hex(12), "optuna")
    psql = _as_server_user([str(bindir / "psql"), "-h", str(root / "sock"), "-p", str(port), "-U", "postgres",
                            "-v", "ON_ERROR_STOP=1", "-c"])
    try:
        subprocess.run(psql + [f"CREATE ROLE {pg.user} LOGIN PASSWORD '{pg.password}'"], check=True,
                       capture_output=True)
        subprocess.run(psql + [f"CREATE DATABASE {pg.database} OWNER {pg.user}"], check=True, capture_output=True)
        yield pg
    finally:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w",
                                        "stop"]), check=False, capture_output=True)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)
