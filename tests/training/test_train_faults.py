"""Faults: a training worker killed mid-run; the job recovers from its latest checkpoint into the same MLflow run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mvar import tracking

pytestmark = pytest.mark.slow


def train_workers(driver_pid: int) -> list[psutil.Process]:
    """Ray Train worker processes of the local Ray that this driver started (not any other Ray on the machine)."""
    out = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def logged_steps(uri: str, name: str) -> tuple[str | None, list[int]]:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("tests")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mvar.run_key` LIKE '%/{name}'") if exp else []
    if not runs:
        return None, []
    assert len(runs) == 1, "one MLflow run per training run, whatever happened to it"
    return runs[0].info.run_id, [m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")]


def test_killed_worker_resumes_from_the_last_checkpoint(tiny_inputs):
    steps, name = 400, "fault"
    cmd = [sys.executable, "-m", "workflows.train", "--config", "workflows/configs/mvar_tiny_local.yaml",
           *tiny_inputs.overrides(name, **{"run.steps": steps, "run.checkpoint_every": 25, "run.log_every": 1,
                                           "run.max_failures": 2})]
    log_path = tiny_inputs.root / "fault.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, killed = time.monotonic() + 300, None
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            _, seen = logged_steps(tiny_inputs.tracking_uri, name)
            workers = train_workers(proc.pid)
            if seen and max(seen) >= 60 and len(workers) == 2:
                killed = max(seen)
                workers[-1].send_signal(signal.SIGKILL)
            time.sleep(0.5)
        assert killed is not None and killed < steps, "the run ended before a worker could be killed"
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert "resumed at step" in text
    run_id, seen = logged_steps(tiny_inputs.tracking_uri, name)
    assert sorted(seen) == list(range(1, steps + 1)), "every step logged exactly once"
    run = tracking.client(tiny_inputs.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mvar.checkpoint"].endswith(f"step_{steps:08d}")
