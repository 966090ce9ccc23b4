"""The local Ray of `mvar.cluster.connect()`: a driver killed with SIGKILL leaves no Ray process behind."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = """
import time
from mvar import cluster
cluster.connect(num_cpus=1)
print("READY", flush=True)
time.sleep(600)
"""
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _names(procs: list[psutil.Process]) -> set[str]:
    out = set()
    for p in procs:
        try:
            out.add(" ".join(p.cmdline()).strip() or p.name())
        except psutil.Error:
            pass
    return out


def _tree_when_agents_are_up(driver: subprocess.Popen, timeout_s: float = 120) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tree = psutil.Process(driver.pid).children(recursive=True)
        if all(any(a in n for n in _names(tree)) for a in AGENTS):
            return tree
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"the local Ray's agents did not start; tree: {_names(tree)}")


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    tree: list[psutil.Process] = []
    try:
        for line in driver.stdout:  # Ray's start-up warnings come first
            if line.strip() == "READY":
                break
        assert driver.poll() is None
        tree = _tree_when_agents_are_up(driver)  # GCS, raylet, dashboard agent, runtime env agent, workers ...
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        deadline = time.monotonic() + 30  # Ray's own agents linger 60 s and more, waiting for the dead GCS
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p in tree if _alive(p)]
        assert not left, f"outlived the driver: {_names(left)}"
    finally:
        if driver.poll() is None:
            driver.kill()
        for p in tree:  # whatever the outcome, nothing of this test stays
            if _alive(p):
                p.kill()


def test_ray_noise_settings_are_off_with_mvar_verbose(monkeypatch):
    """Ray's own messages below ERROR are kept out of the driver's output by Ray's settings, unless verbose."""
    from mvar import cluster
    monkeypatch.delenv(cluster.VERBOSE_ENV, raising=False)
    quiet = cluster.quiet_env(loopback=False)
    assert quiet["RAY_LOGGER_LEVEL"] == "error" and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in quiet
    assert cluster.quiet_env(loopback=True)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert cluster.ray_log_level() == logging.ERROR
    monkeypatch.setenv(cluster.VERBOSE_ENV, "1")
    assert cluster.verbose() and cluster.quiet_env(loopback=True) == {}
    assert cluster.ray_log_level() == logging.INFO
    monkeypatch.delenv(cluster.HEALTH_CHECK_ENV, raising=False)
    assert cluster._runtime_env({"A": "b"}, True) == {"env_vars": {
        cluster.HEALTH_CHECK_ENV: cluster.LOCAL_HEALTH_CHECK_S, cluster.VERBOSE_ENV: "1", "A": "b"}}
    assert cluster._runtime_env({}, False) == {"env_vars": {cluster.VERBOSE_ENV: "1"}}  # a cluster keeps Ray's poll
    monkeypatch.setenv(cluster.HEALTH_CHECK_ENV, "3")  # the user's own setting is not overridden
    assert cluster.HEALTH_CHECK_ENV not in cluster._runtime_env({}, True)["env_vars"]


def test_the_watchdog_ends_a_process_it_never_listed_that_holds_a_file_in_the_session_dir(tmp_path):
    """An agent started after the watchdog's last look (the race this file's SIGKILL test once lost):
    at the end it is found through the log file it keeps open in the Ray session directory. A driver
    holding its own log there (not titled ``ray::...``) is left alone, and so is a spared pid."""
    from mvar import cluster
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    hold = "import sys, time; f = open(sys.argv[1], 'a'); print('OPEN', flush=True); time.sleep(120)"

    def holder(title: str, log: str) -> subprocess.Popen:
        proc = subprocess.Popen([title, "-c", hold, str(session / "logs" / log)], executable=sys.executable,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "OPEN"
        return proc

    procs = []
    try:
        procs += [holder("ray::TestAgent", "agent.log"), holder("python", "driver.log"),
                  holder("ray::SparedWorker", "spared.log")]
        agent, driver, spared = procs
        raylet = subprocess.Popen([sys.executable, "-c", "import time; print('UP', flush=True); time.sleep(120)",
                                   f"--session_dir={session}"], stdout=subprocess.PIPE, text=True)
        procs.append(raylet)
        assert raylet.stdout.readline().strip() == "UP"  # its command line is its own from here on
        assert cluster.session_dirs([psutil.Process(raylet.pid)]) == {str(session)}
        raylet.kill()
        raylet.wait()
        assert cluster.end_processes({}, "no-such-mark", {str(session)}, grace_s=5, spare=(spared.pid,)) == 1
        assert agent.wait(10) is not None and driver.poll() is None and spared.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
