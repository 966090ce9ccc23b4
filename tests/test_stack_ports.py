"""Who holds a port of the stack (fast, no servers): a process of this stack is ended, anyone else's is refused."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from mvar import stack
from mvar.errors import UserError

LISTEN = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); print("up", flush=True); time.sleep(120)
"""


def _listener(port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LISTEN, str(port)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def _spec(tmp_path) -> stack.StackSpec:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return stack.StackSpec(dir=str(tmp_path.resolve()), mlflow_port=port)


def test_a_port_held_by_this_stacks_own_leftover_is_freed(tmp_path):
    spec = _spec(tmp_path)
    proc = _listener(spec.mlflow_port, {stack.OWNER_ENV: spec.dir, stack.SERVICE_ENV: "mlflow"})
    try:
        stack._check_ports(spec, ["mlflow"])
        assert proc.wait(10) is not None and not stack.port_in_use(spec.mlflow_port)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("mark", [{}, {stack.OWNER_ENV: "/another/stack", stack.SERVICE_ENV: "mlflow"}])
def test_a_port_held_by_anyone_else_is_refused_naming_the_holder(tmp_path, mark):
    spec = _spec(tmp_path)
    proc = _listener(spec.mlflow_port, mark)
    try:
        with pytest.raises(UserError, match=rf"port {spec.mlflow_port} \(MLflow\).*pid {proc.pid}.*--mlflow-port"):
            stack._check_ports(spec, ["mlflow"])
        time.sleep(0.2)
        assert proc.poll() is None, "someone else's process was touched"
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_optuna_storage_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """optuna-dashboard's storage: a password in the URL, or a database that cannot be opened, is one error
    naming --optuna-storage, and `up` starts nothing."""
    monkeypatch.delenv("MVAR_OPTUNA_STORAGE", raising=False)
    with pytest.raises(UserError, match=r"--optuna-storage .*\*\*\*.*PGPASSWORD"):
        stack.optuna_storage("postgresql://mvar:secret@127.0.0.1:5432/optuna")
    spec = _spec(tmp_path)
    spec.optuna_storage = f"sqlite:///{tmp_path}/missing-dir/optuna.db"
    with pytest.raises(UserError, match=r"--optuna-storage 'sqlite:///.*missing-dir/optuna.db' cannot be opened"):
        stack.up(spec)
    assert stack.load_spec(spec.dir) is None and not (tmp_path / "missing-dir").exists()
