"""Connecting workflows to Ray: the cluster they were submitted to, or a local one on 127.0.0.1.

``connect()`` is called once by a workflow's driver. Under ``ray job submit``
(or with RAY_ADDRESS set) it joins that cluster; otherwise it starts a local
Ray bound to loopback, sized by ``num_cpus`` (default: every core), with a
capped object store and no dashboard.

A local Ray must not outlive its driver. Ray fate-shares the processes the driver starts itself
(GCS, raylet, dashboard, log monitor die with it), but the raylet's own children, the dashboard
agent and the runtime-env agent, see the raylet go and then block for a minute or more reporting
it to the GCS that is gone too. So a small watchdog process, in a session of its own (a signal to
the driver's process group does not reach it), keeps a list of the local Ray's processes while the
driver lives and ends them all as soon as the driver is gone, however it went. The Ray processes
are the ones carrying ``MVAR_LOCAL_RAY=<mark>`` in their environment (inherited from the driver:
GCS, raylet, workers) and their children (the agents, whose process titles hide their environment);
and, for a child started after the last look, every ``ray::``-titled process holding a file open in the
session directory that the marked raylet names on its command line (every agent keeps its logs there).

What a run prints: Ray's own messages below ERROR are off by default, through Ray's settings
(the driver's ``ray`` logger, ``RAY_LOGGER_LEVEL`` for the ``ray`` loggers of the job's workers),
and Ray Train's INFO lines (``LoggingConfig`` at WARNING in `mvar.training.launch`: its warnings
are about the run, e.g. a resource request delayed by an overloaded CPU); on a Ray bound to 127.0.0.1, where no
node can be drained, Ray Train's preemption watcher is off too (its actor logs a C++ error at
every start). The project's own lines and the workers' prints still reach the driver and
`ray job logs`. ``MVAR_VERBOSE=1`` (the workflows' ``--verbose``) brings Ray's messages back.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from mvar.data import storage
from mvar.errors import UserError

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 500 * 1024 * 1024  # shards stream from disk; Ray objects stay small
_started_here = False  # True when connect() started the local Ray this process uses
LOCAL_MARK_ENV = "MVAR_LOCAL_RAY"  # marks every process of a local Ray started by connect()
WATCH_INTERVAL_S = 0.5
SNAPSHOT_EVERY_S = 0.5  # how often the watchdog lists the local Ray's processes while the driver lives
_watchdog: subprocess.Popen | None = None


# what the job supervisor of `ray job submit` sets for the entrypoint: the job config, whose
# metadata holds the submission id
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


VERBOSE_ENV = "MVAR_VERBOSE"


def in_ray_job() -> bool:
    """True inside the entrypoint of `ray job submit`."""
    return bool(os.environ.get(JOB_CONFIG_ENV))


def verbose() -> bool:
    """MVAR_VERBOSE=1 (or a command's --verbose: mvar.commands.set_verbose): Ray's own INFO and WARNING messages are shown."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_env(loopback: bool) -> dict[str, str]:
    """Environment of the job's Ray workers that keeps Ray's internal messages below ERROR out of the
    driver's output (nothing when verbose). ``loopback``: the Ray is bound to 127.0.0.1, one node that
    is never drained, so Ray Train's preemption watcher has nothing to watch."""
    if verbose():
        return {}
    env = {"RAY_LOGGER_LEVEL": "error",  # the `ray` loggers of plain actors (Ray Train's placement group cleaner)
           "MLFLOW_LOGGING_LEVEL": "WARNING"}  # rank 0's system-metrics monitor announces its start and stop
    if loopback:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


# how often Ray Train's controller polls its workers on a Ray bound to loopback (Ray's default: 2 s); a
# poll is a local call, and a short run ends (or a lost worker is seen) that much sooner
LOCAL_HEALTH_CHECK_S = "0.5"
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def local_env() -> dict[str, str]:
    """Environment of a job's Ray workers when the Ray is bound to loopback (one machine); what the
    driver's environment already sets is kept."""
    return {} if os.environ.get(HEALTH_CHECK_ENV) else {HEALTH_CHECK_ENV: LOCAL_HEALTH_CHECK_S}


def quiet_train_worker() -> None:
    """In a Ray Train worker: Ray Train logs each `ray.train.report` at INFO on a logger named by its
    file path, outside the `ray.train` loggers that its LoggingConfig sets; give that logger the level."""
    if verbose():
        return
    from mvar import ray_private
    ray_private.report_logger().setLevel(logging.WARNING)


def ray_log_level() -> int:
    """Level of the driver's `ray` logger."""
    return logging.INFO if verbose() else logging.ERROR


def check_job_paths(paths: dict[str, str], tracking_uri: str | None) -> None:
    """Inside `ray job submit` the working directory is a temporary copy, different on every node:
    a relative location would read from it (data is not uploaded) or write into it (deleted with
    the job). ``paths``: config key -> location ('' = unset); ``tracking_uri``: the run's
    ``tracking.uri`` ('' = unset), None for a run that is not tracked."""
    if not in_ray_job():
        return
    for key, value in paths.items():
        if value and storage.is_local(value) and not Path(value).is_absolute():
            raise UserError(f"config key '{key}': '{value}' is relative, but a Ray job runs in a temporary copy "
                            f"of the working directory; pass an absolute path on storage every node sees "
                            f"({key}=/abs/path/...)")
    if tracking_uri == "" and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise UserError("config key 'tracking.uri': not set and no MLFLOW_TRACKING_URI in the job's environment; "
                        "the default SQLite store would be deleted with the job's working directory")


def connect(num_cpus: int | None = None, num_gpus: int | None = None, env_vars: dict | None = None) -> str:
    """Join the given cluster or start a local one; returns 'cluster' or 'local'."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    global _started_here
    if ray.is_initialized():
        return "local" if _started_here else "cluster"
    address = os.environ.get("RAY_ADDRESS", "")
    if address or in_ray_job():
        # a dashboard URL (http://...:8265) is what `ray job submit` wants; the driver joins via GCS
        # (inside `ray job submit` RAY_ADDRESS is the GCS of the head the job runs on: loopback on the stack)
        loopback = address.startswith(("127.0.0.1", "localhost", "http://127.0.0.1", "http://localhost"))
        if loopback:
            _advertise_loopback()  # else Ray rewrites loopback to the machine's address and the join hangs
        ray.init(address="auto" if address.startswith("http") or not address else address,
                 runtime_env=_runtime_env(env_vars, loopback), log_to_driver=True, logging_level=ray_log_level())
        return "cluster"
    _advertise_loopback()
    _start_watchdog()
    try:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
                 runtime_env=_runtime_env(env_vars, True), logging_level=ray_log_level())
    except BaseException:
        _stop_watchdog()  # it ends whatever of the Ray had started
        raise
    _started_here = True
    return "local"


def _runtime_env(env_vars: dict | None, loopback: bool) -> dict | None:
    env = {**(local_env() if loopback else {}), **quiet_env(loopback), **({VERBOSE_ENV: "1"} if verbose() else {}),
           **(env_vars or {})}
    return {"env_vars": env} if env else None


def _advertise_loopback() -> None:
    """Make an in-process local Ray use 127.0.0.1 as its node address.

    `ray.init` turns a loopback `_node_ip_address` into the machine's routable
    address unless Ray's single-machine mode (the one it uses on macOS and
    Windows) is on; that switch is read at call time, so flipping it here keeps
    every connection of the local cluster on loopback, as `ray start
    --node-ip-address=127.0.0.1` does for a head started by hand.
    """
    from mvar import ray_private
    ray_private.single_machine_mode()


def is_local() -> bool:
    """True when this process started the Ray it uses (so this machine is the whole cluster)."""
    return _started_here


def job_id() -> str:
    """The Ray job submission id (for the run's tags), '' outside a submitted job."""
    import json
    try:
        meta = json.loads(os.environ.get(JOB_CONFIG_ENV, "") or "{}").get("metadata") or {}
    except ValueError:
        return ""
    return str(meta.get("job_submission_id", ""))


def cluster_resources() -> dict[str, float]:
    import ray
    return dict(ray.cluster_resources())


def shutdown() -> None:
    global _started_here
    import ray
    if ray.is_initialized():
        ray.shutdown()
    _started_here = False
    _stop_watchdog()


# --------------------------------------------------------------------------- the local Ray's watchdog

def _start_watchdog() -> None:
    """Mark this process's environment (so the local Ray inherits it) and watch this process."""
    import secrets
    global _watchdog
    _stop_watchdog()
    mark = f"{os.getpid()}-{secrets.token_hex(6)}"
    env = {k: v for k, v in os.environ.items() if k != LOCAL_MARK_ENV}
    _watchdog = subprocess.Popen([sys.executable, "-m", "mvar.cluster", "watch", str(os.getpid()), mark],
                                 env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    os.environ[LOCAL_MARK_ENV] = mark


def _stop_watchdog() -> None:
    """After a clean shutdown: the watchdog ends what may be left of the local Ray, then itself."""
    global _watchdog
    os.environ.pop(LOCAL_MARK_ENV, None)
    if _watchdog is None:
        return
    _watchdog.terminate()  # its SIGTERM handler sweeps and exits
    try:
        _watchdog.wait(15)
    except subprocess.TimeoutExpired:
        _watchdog.kill()
        _watchdog.wait()
    _watchdog = None


def _has_mark(proc, mark: str) -> bool:
    import psutil
    try:
        return proc.environ().get(LOCAL_MARK_ENV) == mark
    except (psutil.Error, OSError):
        return False


def _alive(proc) -> bool:
    import psutil
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # is_running: same start time
    except psutil.Error:
        return False


def _with_children(procs) -> dict:
    import psutil
    found = {p.pid: p for p in procs}
    for proc in procs:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return found


def ray_processes(driver, mark: str) -> dict:
    """The local Ray's processes below a live driver: the marked ones and their children."""
    import psutil
    try:
        below = driver.children(recursive=True)
    except psutil.Error:
        return {}
    return _with_children([p for p in below if _has_mark(p, mark)])


def session_dirs(procs) -> set[str]:
    """The Ray session directories named on the command lines of `procs` (raylet, GCS: ``--session_dir=``,
    ``--session-dir=``)."""
    import psutil
    found = set()
    for proc in procs:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        for arg in cmdline:
            for flag in ("--session_dir=", "--session-dir="):
                if arg.startswith(flag) and len(arg) > len(flag):
                    found.add(arg[len(flag):].rstrip("/"))
    return found


def _ray_titled_holding_file_in(proc, dirs: set[str]) -> bool:
    """A Ray process (its title ``ray::...``: an agent, a worker) with a file open under one of `dirs`.
    Drivers, which hold their own logs there too, are never taken for one."""
    import psutil
    try:
        cmdline = proc.cmdline()
        return bool(cmdline) and cmdline[0].startswith("ray::") and any(
            f.path.startswith(d + "/") for f in proc.open_files() for d in dirs)
    except (psutil.Error, OSError):
        return False


def end_processes(procs: dict, mark: str, sessions: set[str] = frozenset(), grace_s: float = 3.0,
                  spare: tuple[int, ...] = ()) -> int:
    """End what is alive of `procs`, every process still carrying the mark, every Ray-titled process
    holding a file open under one of the session directories `sessions`, and their children (never this
    process or those in `spare`): SIGTERM, then SIGKILL after `grace_s`. Returns how many there were."""
    import psutil
    keep = {os.getpid(), *spare}
    marked = [p for p in psutil.process_iter() if p.pid not in keep and (
        _has_mark(p, mark) or (sessions and _ray_titled_holding_file_in(p, sessions)))]
    targets = [p for p in _with_children([*procs.values(), *marked]).values() if p.pid not in keep and _alive(p)]
    for proc in targets:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(targets, timeout=grace_s)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(targets)


def _watch(driver_pid: int, mark: str) -> None:
    """The watchdog: list the local Ray's processes while the driver lives; when it is gone (or on
    SIGTERM, after a clean shutdown) end what is left of them."""
    import signal

    import psutil
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    known: dict = {}
    sessions: set[str] = set()
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        driver = None
    last = 0.0
    while not stop and driver is not None and _alive(driver):
        if time.monotonic() - last >= SNAPSHOT_EVERY_S:
            known.update(ray_processes(driver, mark))
            known = {pid: p for pid, p in known.items() if _alive(p)}
            if not sessions:
                sessions = session_dirs(known.values())
            last = time.monotonic()
        time.sleep(WATCH_INTERVAL_S)
    end_processes(known, mark, sessions, spare=(driver_pid,))  # after a clean shutdown the driver lives on


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "watch":
    _watch(int(sys.argv[2]), sys.argv[3])
