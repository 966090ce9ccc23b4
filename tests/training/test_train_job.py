"""`ray job submit` of workflows.train against a head on loopback (the local stack), end to end."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mvar import stack, tracking

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory):
    d = tmp_path_factory.mktemp("stack") / "stack"
    ports = [stack.free_port() for _ in range(4)]
    spec = stack.StackSpec(dir=str(d), ray_port=ports[0], dashboard_port=ports[1], mlflow_port=ports[2],
                           optuna_port=ports[3], optuna_storage=f"sqlite:///{d.parent / 'optuna.db'}",
                           num_cpus=2, object_store_mb=300)
    try:
        stack.up(spec)
        yield d
    finally:
        stack.down(d)
        spec = stack.load_spec(d)
        if spec is not None and spec.temp_dir.startswith("/tmp/mvar-ray-"):
            shutil.rmtree(spec.temp_dir, ignore_errors=True)


# Ray's internals that a run's output showed before Ray's logging settings were set (mvar.cluster):
# the placement group cleaner's State API warnings, the preemption watcher's C++ error, Ray Train's
# dump of every report and checkpoint, its worker-group start lines
RAY_NOISE = ("PlacementGroupCleaner", "State API", "PreemptionWatcher", "core_worker.cc", "Reporting training result",
             "Checkpoint successfully created", "Started training worker group", "Requesting resources")


def assert_readable_progress(output: str, steps: int, pattern) -> None:
    """One progress line per log step (log_every=1) with its fields, and none of Ray's noise."""
    seen = [int(m.group(1)) for m in pattern.finditer(output) if int(m.group(2)) == steps]
    assert seen == list(range(1, steps + 1)), f"progress lines for steps {seen}:\n{output[-3000:]}"
    noisy = [line for line in output.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noisy, "Ray's internal messages in the job's output:\n" + "\n".join(noisy[:20])


def test_ray_job_submit_trains_and_logs_to_the_stack(tiny_inputs, running_stack, listeners,
                                                      progress_line_pattern):
    env = stack.stack_env(running_stack, os.environ)
    submission = f"mvar-test-{uuid.uuid4().hex[:8]}"
    # tracking.uri left empty: the job takes MLFLOW_TRACKING_URI from the head (the stack's server)
    overrides = tiny_inputs.overrides("job", **{"run.steps": 6, "run.checkpoint_every": 3, "run.log_every": 1,
                                                "tracking.uri": "''"})
    cmd = [RAY, "job", "submit", "--address", env["RAY_ADDRESS"], "--submission-id", submission,
           "--working-dir", str(REPO), "--", "python", "-m", "workflows.train",
           "--config", "workflows/configs/var_tiny_local.yaml", *overrides]
    spec = stack.load_spec(running_stack)
    # the head's processes (its job driver and the 2 training workers among them), sampled during the job
    with listeners.Watch(lambda: [p.pid for p in stack.head_processes(spec)], interval_s=1.0) as watch:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    watch.assert_listeners_on("127.0.0.1", expect=("RayTrainWorker", "workflows.train"))
    assert "done: 6 steps" in done.stdout
    assert_readable_progress(done.stdout + done.stderr, 6, progress_line_pattern)
    c = tracking.client(env["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("tests").experiment_id],
                         filter_string=f"tags.`mvar.ray_job_id` = '{submission}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["mvar.variant"] == "var"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert Path(run.data.tags["mvar.checkpoint"]).is_dir()  # absolute storage, outside the job's working dir
