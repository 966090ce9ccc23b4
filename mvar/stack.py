"""`mvar stack up | status | down`: a local Ray head, MLflow tracking server and optuna-dashboard on 127.0.0.1.

The stack lives in one directory (default ``out/stack``): ``stack.json`` (the settings `up` used,
so `status`, `down` and :func:`stack_env` need no flags), ``env.sh`` (the client environment),
``mlflow.db`` / ``mlartifacts`` (the tracking store), ``ray_auth_token`` (mode 0600), pid files and
``logs/``. Ray keeps its own session files in a short ``/tmp/mvar-ray-<hash>`` directory.
optuna-dashboard serves the sweeps' Optuna storage (by default the project's SQLite file, the one
`python -m sweeps.run` uses: `sweeps.storage`).

Several Ray heads may run on one machine (other people's tests, other stacks), so `down` never runs
``ray stop`` (which stops every Ray process of the machine): it ends only the processes of this
head, found by the session id `up` started it in and by its private temp directory.

Every process a stack starts carries ``MVAR_STACK_DIR`` / ``MVAR_STACK_SERVICE`` in its environment,
which its children inherit: so the stack owns the whole tree of each server even when a parent dies
(``mlflow server`` is a parent whose uvicorn child serves the port and outlives it; optuna-dashboard
is one process). `status` reports
such a survivor, `up` adopts one that still answers and ends one that does not, `down` stops them all;
only a port held by a process without the marker is someone else's and refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mvar.errors import UserError

HOST = "127.0.0.1"
DEFAULT_DIR = "out/stack"
STATE_FILE, ENV_FILE, TOKEN_FILE = "stack.json", "env.sh", "ray_auth_token"
RAY_PID_FILE, MLFLOW_PID_FILE, OPTUNA_PID_FILE = "ray.pid", "mlflow.pid", "optuna-dashboard.pid"
SERVICES = ("ray", "mlflow", "optuna")
# the servers started as a process group of their own, with the pid file of the group's leader and a
# word of its command line (so a reused pid is not taken for ours)
SERVERS = {"mlflow": (MLFLOW_PID_FILE, "mlflow"), "optuna": (OPTUNA_PID_FILE, "optuna")}
RAY_START_TIMEOUT_S = 120.0  # `ray start` takes ~10 s alone, more when the machine is busy
READY_TIMEOUT_S = 180.0  # MLflow needs ~20 s to answer on 2 idle cores, a minute when busy
STOP_GRACE_S = 8.0
AUTH_MODES = ("token", "disabled")
OWNER_ENV, SERVICE_ENV = "MVAR_STACK_DIR", "MVAR_STACK_SERVICE"  # the marks of a stack's processes


@dataclass
class StackSpec:
    """What `up` was asked for, saved as DIR/stack.json."""

    dir: str
    ray_port: int = 6379
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    optuna_port: int = 8080        # optuna-dashboard's own default
    optuna_storage: str = ""       # the storage it serves; `up` fills in the sweeps' default when empty
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_mb: int = 2000
    auth: str = "token"
    # filled in by `up`: Ray's private temp dir, the session id of the head's processes and the
    # ports Ray would otherwise take at fixed defaults (clashing with a second head on the machine)
    temp_dir: str = ""
    ray_session_id: int = 0
    extra_ports: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def optuna_url(self) -> str:
        return f"http://{HOST}:{self.optuna_port}"

    @property
    def token_path(self) -> Path:
        return self.path / TOKEN_FILE


@dataclass
class ServiceStatus:
    name: str
    running: bool
    address: str
    pid: int | None
    note: str = ""
    leftover: bool = False  # processes of this stack that cannot serve (`up` ends them, so does `down`)


# --------------------------------------------------------------------------- state and environment

def _resolve_dir(directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser().resolve()


def load_spec(directory: str | os.PathLike) -> StackSpec | None:
    """The settings of the stack in `directory`, or None if `up` never ran there."""
    state = _resolve_dir(directory) / STATE_FILE
    if not state.is_file():
        return None
    try:
        return StackSpec(**json.loads(state.read_text()))
    except (ValueError, TypeError) as err:
        raise UserError(f"{state} is unreadable ({err}); remove it and run `mvar stack up` again") from err


def _save_spec(spec: StackSpec) -> None:
    (spec.path / STATE_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def _client_vars(spec: StackSpec) -> dict[str, str]:
    env = {"RAY_ADDRESS": spec.dashboard_url, "RAY_AUTH_MODE": spec.auth,
           "MLFLOW_TRACKING_URI": spec.mlflow_url,
           "MVAR_OPTUNA_DASHBOARD_URL": spec.optuna_url,
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           # Ray turns a loopback address into the machine's public one (where nothing of this stack
           # listens) unless it believes multi-node clusters are off: keep 127.0.0.1 as it is, for
           # the head and for drivers that connect to the GCS directly
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if spec.auth == "token":
        # a path, not the token itself: env.sh and process listings never show the secret
        env["RAY_AUTH_TOKEN_PATH"] = str(spec.token_path)
    return env


def stack_env(directory: str | os.PathLike = DEFAULT_DIR,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a client needs to use the stack in `directory` (what env.sh exports).

    Without `base` only the stack's variables come back. With `base` (e.g. ``os.environ``) the result
    is a full environment for a subprocess: `base` plus the stack's variables, minus RAY_AUTH_TOKEN,
    which Ray would prefer over the stack's token file.
    """
    spec = load_spec(directory)
    if spec is None:
        raise UserError(f"no stack in {_resolve_dir(directory)}: run `mvar stack up --dir {directory}` first")
    return _client_vars(spec) if base is None else _merged_env(spec, base)


def _merged_env(spec: StackSpec, base: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k != "RAY_AUTH_TOKEN"}
    env.update(_client_vars(spec))
    return env


def _child_env(spec: StackSpec, service: str) -> dict[str, str]:
    """Environment of the servers (and so of every Ray worker and job driver), marked as this stack's."""
    env = _merged_env(spec, os.environ)
    env.pop("MVAR_LOCAL_RAY", None)  # a local Ray's mark (mvar.cluster): its watchdog would end the stack with it
    env[OWNER_ENV], env[SERVICE_ENV] = spec.dir, service
    env.pop("RAY_ADDRESS", None)  # the head takes its addresses from flags
    if service == "ray":
        # the head's workers: Ray Train's placement group cleaner asks the State API about its controller,
        # and without an address it guesses among every Ray of the machine (an error when there are several)
        env["RAY_ADDRESS"] = f"{HOST}:{spec.ray_port}"
    # jobs run `python ...` from PATH: make that the interpreter that has ray and mvar installed
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["AUTOSCALER_METRIC_PORT"] = str(spec.extra_ports["autoscaler_metrics"])
    env["DASHBOARD_METRIC_PORT"] = str(spec.extra_ports["dashboard_metrics"])
    return env


def _write_env_file(spec: StackSpec) -> Path:
    lines = [f"# written by `mvar stack up`; use it with: source {spec.path / ENV_FILE}"]
    if spec.auth == "token":
        lines.append("unset RAY_AUTH_TOKEN  # would take precedence over RAY_AUTH_TOKEN_PATH")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in _client_vars(spec).items()]
    path = spec.path / ENV_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _ensure_token(spec: StackSpec) -> None:
    """A per-stack token file (Ray's format: 64 hex chars), created once with mode 0600."""
    if spec.auth != "token" or spec.token_path.is_file():
        return
    import secrets
    fd = os.open(spec.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


# --------------------------------------------------------------------------- ports and probes

def port_in_use(port: int) -> bool:
    """True if something (on any address) holds `port`, so a server could not bind 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: TIME_WAIT leftovers of a server that just stopped do not count as in use
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _http_status(url: str, headers: Mapping[str, str] | None = None, timeout: float = 3.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers or {})),
                                    timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return None


def _ray_headers(spec: StackSpec) -> dict[str, str]:
    if spec.auth == "token" and spec.token_path.is_file():
        return {"Authorization": "Bearer " + spec.token_path.read_text().strip()}
    return {}


def _ray_answers(spec: StackSpec) -> bool:
    # the jobs API (not just /api/version): it is what `ray job submit` needs, and it runs in a
    # dashboard subprocess that becomes ready a little after the dashboard itself
    return _http_status(spec.dashboard_url + "/api/jobs/", _ray_headers(spec)) == 200


def _mlflow_answers(spec: StackSpec) -> bool:
    return _http_status(spec.mlflow_url + "/health") == 200


def _optuna_answers(spec: StackSpec) -> bool:
    return _http_status(spec.optuna_url + "/api/studies") == 200


def _answers(spec: StackSpec, service: str) -> bool:
    return {"ray": _ray_answers, "mlflow": _mlflow_answers, "optuna": _optuna_answers}[service](spec)


# --------------------------------------------------------------------------- processes

def _alive(proc) -> bool:
    import psutil
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _refers_to(cmdline: list[str], directory: str) -> bool:
    return any(a == directory or a.endswith("=" + directory) or directory + "/" in a for a in cmdline)


def _self_and_parents() -> set[int]:
    import psutil
    return {os.getpid(), *(p.pid for p in psutil.Process().parents())}


def marked_processes(spec_dir: str | os.PathLike, service: str) -> list:
    """Live processes that the stack in `spec_dir` started for `service`, or that those started."""
    import psutil
    directory, own, found = str(_resolve_dir(spec_dir)), _self_and_parents(), []
    for proc in psutil.process_iter():
        try:
            if proc.pid in own or not _alive(proc):
                continue
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get(OWNER_ENV) == directory and env.get(SERVICE_ENV) == service:
            found.append(proc)
    return found


def head_processes(spec: StackSpec) -> list:
    """Live processes of this stack's Ray head: marked ones, its session and temp dir, and their descendants."""
    import psutil
    found = {p.pid: p for p in marked_processes(spec.dir, "ray")} if spec.dir else {}
    if not spec.temp_dir:
        return list(found.values())
    own = _self_and_parents()
    by_dir, by_session = {}, {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in own or not _alive(proc):
                continue
            if _refers_to(proc.info["cmdline"] or [], spec.temp_dir):
                by_dir[proc.pid] = proc
            if spec.ray_session_id > 1 and os.getsid(proc.pid) == spec.ray_session_id:
                by_session[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    # trust the recorded session id only while one of its processes still uses our temp dir
    # (after a reboot the number may belong to someone else's session)
    found.update(by_dir)
    if by_session.keys() & by_dir.keys() and spec.ray_session_id != os.getsid(0):
        found.update(by_session)
    for proc in list(found.values()):
        try:
            found.update({c.pid: c for c in proc.children(recursive=True) if c.pid not in own})
        except psutil.Error:
            pass
    return [p for p in found.values() if _alive(p)]


def _proc_name(proc) -> str:
    import psutil
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _gcs_pid(spec: StackSpec) -> int | None:
    gcs = [p.pid for p in head_processes(spec) if _proc_name(p) == "gcs_server"]
    return gcs[0] if gcs else None


def _terminate(procs: list, grace: float) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left (zombies count as gone)."""
    import psutil
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    deadline = time.monotonic() + grace
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in procs:
        if _alive(proc):
            try:
                proc.kill()
            except psutil.Error:
                pass


def _stop_ray(spec: StackSpec) -> str:
    procs = head_processes(spec)
    if not procs:
        return "ray: not running"
    name = _proc_name
    # the order `ray stop` uses: the raylet first (it ends its workers and agents), the GCS last
    # (the others would log errors about a vanished GCS)
    _terminate([p for p in procs if name(p) == "raylet"], STOP_GRACE_S)
    _terminate([p for p in procs if _alive(p) and name(p) not in ("raylet", "gcs_server")], STOP_GRACE_S)
    _terminate([p for p in procs if _alive(p)], STOP_GRACE_S)
    # workers started while we were stopping the rest
    _terminate(head_processes(spec), 2.0)
    left = head_processes(spec)
    if left:
        raise UserError(f"ray: could not stop pids {[p.pid for p in left]}")
    return f"ray: stopped ({len(procs)} processes)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _server_pid(spec_dir: Path, service: str) -> int | None:
    """The pid in the service's pid file if that process is still the leader of our server's own process group."""
    import psutil
    pid_file, word = SERVERS[service]
    pid = _read_pid(spec_dir / pid_file)
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        ours = _alive(proc) and os.getpgid(pid) == pid and word in " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return None
    return pid if ours else None


def mlflow_processes(spec_dir: Path) -> list:
    return server_processes(spec_dir, "mlflow")


def optuna_processes(spec_dir: Path) -> list:
    return server_processes(spec_dir, "optuna")


def server_processes(spec_dir: Path, service: str) -> list:
    """Every live process of this stack's server `service`: the marked ones and the leader's process group."""
    import psutil
    found = {p.pid: p for p in marked_processes(spec_dir, service)}
    leader = _server_pid(Path(spec_dir), service)
    if leader is not None:
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == leader and _alive(proc):
                    found.setdefault(proc.pid, proc)
            except (psutil.Error, OSError):
                continue
    return list(found.values())


def _listener_pid(procs: list, port: int) -> int | None:
    """Which of `procs` listens on `port` (the process that actually serves)."""
    holder = port_holder(port)
    return holder if holder in {p.pid for p in procs} else None


def port_holder(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (any address), None if none or not visible to us."""
    import psutil
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def _stop_server(spec_dir: Path, service: str) -> str:
    procs = server_processes(spec_dir, service)
    if not procs:
        return f"{service}: not running"
    # the whole tree at once (as the process-group signal did), parent or not: uvicorn stops cleanly on SIGTERM
    _terminate(procs, STOP_GRACE_S)
    left = server_processes(spec_dir, service)
    if left:
        raise UserError(f"{service}: could not stop pids {[p.pid for p in left]}")
    return f"{service}: stopped (pids {sorted(p.pid for p in procs)})"


# --------------------------------------------------------------------------- starting

def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"  # the venv's ray, even when the venv is not activated
    if beside.is_file():
        return str(beside)
    import shutil
    found = shutil.which("ray")
    if found is None:
        raise UserError("the `ray` command was not found (pip install 'ray[default]')")
    return found


def _ray_temp_dir(spec_dir: Path) -> str:
    # Ray puts unix sockets under its temp dir and socket paths must stay below 107 bytes, so a
    # short fixed root rather than somewhere inside DIR; the hash keeps two stacks apart
    return f"/tmp/mvar-ray-{hashlib.sha1(str(spec_dir).encode()).hexdigest()[:8]}"


def _ray_command(spec: StackSpec) -> list[str]:
    cmd = [_ray_executable(), "start", "--head", f"--node-ip-address={HOST}", f"--dashboard-host={HOST}",
           f"--port={spec.ray_port}", f"--dashboard-port={spec.dashboard_port}",
           f"--object-store-memory={spec.object_store_mb * 1_000_000}", "--disable-usage-stats",
           f"--temp-dir={spec.temp_dir}",
           # both default to fixed ports (10001, 52365) that a second head on the machine would want
           f"--ray-client-server-port={spec.extra_ports['client_server']}",
           f"--dashboard-agent-listen-port={spec.extra_ports['dashboard_agent']}"]
    if spec.num_cpus is not None:
        cmd.append(f"--num-cpus={spec.num_cpus}")
    if spec.num_gpus is not None:
        cmd.append(f"--num-gpus={spec.num_gpus}")
    return cmd


def _start_ray(spec: StackSpec) -> subprocess.Popen:
    """Launch `ray start` in a new session: every process of the head inherits that session id."""
    with open(spec.path / "logs" / "ray-start.log", "w") as log:
        # cwd=DIR: a job's entrypoint runs in the head's cwd, where a folder named like a package
        # (e.g. /tmp/ray) would shadow the real one
        return subprocess.Popen(_ray_command(spec), cwd=spec.path, env=_child_env(spec, "ray"), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _start_mlflow(spec: StackSpec) -> int:
    d = spec.path
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
           "--default-artifact-root", str(d / "mlartifacts"), "--artifacts-destination", str(d / "mlartifacts"),
           "--host", HOST, "--port", str(spec.mlflow_port),
           # one uvicorn process (requests run in its threads): the default 4 took twice as long to
           # start on 2 busy cores, and one writer suits SQLite
           "--workers", "1"]
    env = _child_env(spec, "mlflow")
    # MLflow's job runner (GenAI evaluation jobs, not needed to track runs) adds 7 huey processes
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(d / "logs" / "mlflow.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (d / MLFLOW_PID_FILE).write_text(f"{proc.pid}\n")
    return proc.pid


def _optuna_executable() -> str:
    beside = Path(sys.executable).parent / "optuna-dashboard"
    if beside.is_file():
        return str(beside)
    import shutil
    found = shutil.which("optuna-dashboard")
    if found is None:
        raise UserError("the `optuna-dashboard` command was not found (pip install optuna-dashboard)")
    return found


def optuna_storage(flag: str = "") -> str:
    """The storage optuna-dashboard serves: --optuna-storage, else the sweeps' own rule (MVAR_OPTUNA_STORAGE,
    else the project's SQLite file, made absolute). A password is refused: it would stand in stack.json and
    in the server's command line (PostgreSQL takes it from PGPASSWORD, which the server inherits)."""
    from sweeps.storage import masked, storage_url
    from sweeps.study import has_password
    url = storage_url(flag)
    if has_password(url):
        raise UserError(f"--optuna-storage '{masked(url)}' holds a password; give the URL without it and the "
                        f"password in PGPASSWORD (or ~/.pgpass)")
    return url


def _create_optuna_tables(url: str) -> None:
    """optuna-dashboard opens a storage without creating Optuna's tables: an empty or new database (the
    sweeps' SQLite file before the first sweep) gets them here, as the first sweep would."""
    import optuna

    from sweeps.storage import masked
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--optuna-storage '{masked(url)}' cannot be opened ({type(err).__name__}: {first}); "
                        f"check the URL, the database and PGUSER/PGPASSWORD, or pass another --optuna-storage") from err
    storage.engine.dispose()


def _start_optuna(spec: StackSpec) -> int:
    d = spec.path
    # wsgiref: one process (threads per request), as for MLflow
    cmd = [_optuna_executable(), spec.optuna_storage, "--host", HOST, "--port", str(spec.optuna_port),
           "--server", "wsgiref"]
    with open(d / "logs" / "optuna-dashboard.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=d, env=_child_env(spec, "optuna"), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (d / OPTUNA_PID_FILE).write_text(f"{proc.pid}\n")
    return proc.pid


def _wait_ray_start(spec: StackSpec, proc: subprocess.Popen) -> None:
    log = spec.path / "logs" / "ray-start.log"
    try:
        rc = proc.wait(timeout=RAY_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"`ray start` did not finish in {RAY_START_TIMEOUT_S:.0f} s; see {log}") from None
    if rc != 0:
        raise UserError(f"`ray start` failed (exit {rc}); see {log}")
    gcs_pid = _gcs_pid(spec)
    if gcs_pid is not None:
        (spec.path / RAY_PID_FILE).write_text(f"{gcs_pid}\n")


def _wait_ready(spec: StackSpec, names: list[str]) -> None:
    """Poll until every named service answers; fail early when a server process died."""
    logs = {"ray": f"{spec.path / 'logs' / 'ray-start.log'} and {spec.temp_dir}/session_latest/logs",
            "mlflow": str(spec.path / "logs" / "mlflow.log"),
            "optuna": str(spec.path / "logs" / "optuna-dashboard.log")}
    titles = {"mlflow": "the MLflow server", "optuna": "optuna-dashboard"}
    waiting = list(names)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while waiting:
        waiting = [n for n in waiting if not _answers(spec, n)]
        for name in (n for n in waiting if n in SERVERS):
            if _server_pid(spec.path, name) is None:
                raise UserError(f"{titles[name]} exited during start-up; see {logs[name]}")
        if "ray" in waiting and _gcs_pid(spec) is None:
            raise UserError(f"the Ray head is gone (no gcs_server left); see {logs['ray']}")
        if waiting and time.monotonic() > deadline:
            raise UserError(f"{' and '.join(waiting)} did not answer within {READY_TIMEOUT_S:.0f} s; "
                            f"see {' and '.join(logs[n] for n in waiting)}")
        if waiting:
            time.sleep(0.5)


# --------------------------------------------------------------------------- up / status / down

def status(directory: str | os.PathLike = DEFAULT_DIR) -> list[ServiceStatus]:
    """Whether each service of the stack in `directory` runs and answers."""
    spec = load_spec(directory)
    if spec is None:
        return [ServiceStatus(name, False, "", None, "never started here") for name in SERVICES]
    return [_ray_status(spec), _server_status(spec, "mlflow", spec.mlflow_url, spec.mlflow_port),
            _server_status(spec, "optuna", f"{spec.optuna_url} ({spec.optuna_storage})", spec.optuna_port)]


def _ray_status(spec: StackSpec) -> ServiceStatus:
    address = f"{spec.dashboard_url} (GCS {HOST}:{spec.ray_port})"
    procs = head_processes(spec)
    gcs = [p.pid for p in procs if _proc_name(p) == "gcs_server"]
    if not procs:
        return ServiceStatus("ray", False, address, None)
    if not gcs:
        return ServiceStatus("ray", False, address, None, f"{len(procs)} processes of this head left without "
                             "its GCS (`up` ends them, so does `down`)", leftover=True)
    ok = _ray_answers(spec)
    return ServiceStatus("ray", ok, address, gcs[0], "" if ok else "processes up but the jobs API does not answer")


def _server_status(spec: StackSpec, service: str, address: str, port: int) -> ServiceStatus:
    procs = server_processes(spec.path, service)
    if not procs:
        return ServiceStatus(service, False, address, None)
    parent, serving = _server_pid(spec.path, service), _listener_pid(procs, port)
    ok = serving is not None and _answers(spec, service)
    if parent is not None:
        return ServiceStatus(service, ok, address, parent, "" if ok else "process up but it does not answer")
    gone = f"its parent pid {_read_pid(spec.path / SERVERS[service][0])} is gone"
    if ok:  # the uvicorn worker outlived `mlflow server`: it still serves, and it is ours
        return ServiceStatus(service, True, address, serving, f"{gone}; its server process still serves")
    return ServiceStatus(service, False, address, None, f"{gone}; {len(procs)} processes of it left, "
                         "not answering (`up` ends them, so does `down`)", leftover=True)


def _check_ports(spec: StackSpec, names: list[str]) -> None:
    wanted = {"ray": [("Ray GCS", "--ray-port", spec.ray_port), ("Ray dashboard", "--dashboard-port",
                                                                  spec.dashboard_port)],
              "mlflow": [("MLflow", "--mlflow-port", spec.mlflow_port)],
              "optuna": [("optuna-dashboard", "--optuna-port", spec.optuna_port)]}
    for name in names:
        for what, flag, port in wanted[name]:
            if port_in_use(port) and _end_own_holder(spec, port):
                time.sleep(0.5)  # the port is freed once the holder's socket is closed
            if port_in_use(port):
                holder = port_holder(port)
                who = f" (pid {holder}: {_describe_pid(holder)})" if holder else ""
                raise UserError(f"port {port} ({what}) on {HOST} is already in use by another process{who}: "
                                f"stop that process or choose another port with {flag}")


def _end_own_holder(spec: StackSpec, port: int) -> bool:
    """If a process of this stack (by its mark; e.g. one left from before stack.json was removed) holds
    `port`, end every process of its service; True if it did."""
    import psutil
    holder = port_holder(port)
    try:
        env = psutil.Process(holder).environ() if holder else {}
    except psutil.Error:
        return False
    if env.get(OWNER_ENV) != spec.dir or env.get(SERVICE_ENV) not in SERVICES:
        return False
    _terminate(marked_processes(spec.dir, env[SERVICE_ENV]), STOP_GRACE_S)
    return True


def _describe_pid(pid: int) -> str:
    import psutil
    try:
        return " ".join(" ".join(psutil.Process(pid).cmdline()).split())[:80] or "?"  # one line
    except psutil.Error:
        return "?"


def _end_leftovers(spec: StackSpec, services: list[ServiceStatus]) -> list[str]:
    """Stop this stack's processes that cannot serve (a head without GCS, an MLflow tree not answering)."""
    lines = []
    for s in services:
        if s.leftover:
            lines.append(f"ended leftovers of {s.name}: " + (_stop_ray(spec) if s.name == "ray"
                                                                else _stop_server(spec.path, s.name)))
    return lines


def up(spec: StackSpec) -> list[str]:
    """Start what is not running yet; return the lines to print."""
    spec.dir = str(_resolve_dir(spec.dir))
    spec.optuna_storage = optuna_storage(spec.optuna_storage)
    previous = load_spec(spec.dir)
    running: set[str] = set()
    notes: list[str] = []
    if previous is not None:
        services = status(spec.dir)
        notes = _end_leftovers(previous, services)
        running = {s.name for s in services if s.pid and not s.leftover}
        if running == set(SERVICES):
            # processes of all are there: at most still starting (e.g. a concurrent `up`)
            _wait_ready(previous, [s.name for s in services if not s.running])
            return [f"stack already up in {spec.dir}"] + _settings_note(spec, previous) + _describe(previous)
        if running:  # a half-up stack: finish it with the settings its running part uses
            notes, spec = notes + _settings_note(spec, previous), previous
            spec.optuna_storage = spec.optuna_storage or optuna_storage()  # a stack.json from before optuna
    todo = [n for n in SERVICES if n not in running]
    _check_ports(spec, todo)  # before starting anything
    if "optuna" in todo:
        _create_optuna_tables(spec.optuna_storage)
    (spec.path / "logs").mkdir(parents=True, exist_ok=True)
    if "ray" in todo:
        spec.temp_dir = _ray_temp_dir(spec.path)
        spec.extra_ports = {k: free_port() for k in
                            ("client_server", "dashboard_agent", "autoscaler_metrics", "dashboard_metrics")}
    _ensure_token(spec)
    _save_spec(spec)
    try:
        _start_all(spec, todo)
    except BaseException:
        _stop_started(spec, todo)
        raise
    _write_env_file(spec)
    return [f"stack up in {spec.dir} (started: {', '.join(todo)})"] + notes + _describe(spec)


def _settings_note(requested: StackSpec, kept: StackSpec) -> list[str]:
    # only settings the flags changed from their defaults: a bare `mvar stack up` asks for nothing
    defaults = StackSpec(dir="")
    keys = ("ray_port", "dashboard_port", "mlflow_port", "optuna_port", "num_cpus", "num_gpus", "object_store_mb",
            "auth")
    changed = [k for k in keys if getattr(requested, k) not in (getattr(kept, k), getattr(defaults, k))]
    if kept.optuna_storage and requested.optuna_storage not in (kept.optuna_storage, optuna_storage()):
        changed.append("optuna_storage")
    if not changed:
        return []
    return [(f"note: the running stack keeps its settings, ignored: {', '.join(changed)} "
             f"(run `mvar stack down --dir {kept.dir}` first to change them)")]


def _start_all(spec: StackSpec, todo: list[str]) -> None:
    # MLflow first: it is the slower one and comes up while `ray start` runs
    if "mlflow" in todo:
        _start_mlflow(spec)
    if "optuna" in todo:
        _start_optuna(spec)
    if "ray" in todo:
        proc = _start_ray(spec)
        spec.ray_session_id = proc.pid  # start_new_session: the session id is the leader's pid
        _save_spec(spec)
        _wait_ray_start(spec, proc)
    _wait_ready(spec, todo)


def _stop_started(spec: StackSpec, todo: list[str]) -> None:
    if "ray" in todo:
        _stop_ray(spec)
    for name in SERVERS:
        if name in todo:
            _stop_server(spec.path, name)


def _describe(spec: StackSpec) -> list[str]:
    lines = [f"  ray dashboard / jobs API: {spec.dashboard_url}  (GCS {HOST}:{spec.ray_port}, auth {spec.auth})",
             f"  mlflow UI / tracking:     {spec.mlflow_url}",
             f"  optuna-dashboard:         {spec.optuna_url}  (storage {spec.optuna_storage})",
             f"environment ({spec.path / ENV_FILE}):"]
    lines += [f"  export {k}={shlex.quote(v)}" for k, v in _client_vars(spec).items()]
    lines.append(f"use it in a shell with: source {spec.path / ENV_FILE}")
    return lines


def down(directory: str | os.PathLike = DEFAULT_DIR) -> list[str]:
    """Stop this stack's Ray head, MLflow server and optuna-dashboard; safe to repeat."""
    d = _resolve_dir(directory)
    spec = load_spec(d)
    lines = [_stop_ray(spec) if spec is not None else "ray: not running", *(_stop_server(d, n) for n in SERVERS)]
    for name in (RAY_PID_FILE, MLFLOW_PID_FILE, OPTUNA_PID_FILE):
        (d / name).unlink(missing_ok=True)
    return lines


# --------------------------------------------------------------------------- command line

def register(subparsers) -> None:
    stack = subparsers.add_parser("stack", help="a local Ray head + MLflow server + optuna-dashboard on 127.0.0.1",
                                  description="Start, inspect and stop a local Ray head (jobs API, dashboard), "
                                              "an MLflow tracking server and optuna-dashboard, all on 127.0.0.1.")
    commands = stack.add_subparsers(dest="stack_command", metavar="STACK_COMMAND", help="what to do with the stack")
    commands.required = True
    _add_up(commands)
    p = commands.add_parser("status", help="is each service running; exit 0 if all are")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"stack directory (default {DEFAULT_DIR})")
    p.set_defaults(func=run_status)
    p = commands.add_parser("down", help="stop this stack's services (other Ray instances are left alone)")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"stack directory (default {DEFAULT_DIR})")
    p.set_defaults(func=run_down)


def _add_up(commands) -> None:
    p = commands.add_parser("up", help="start the Ray head, the MLflow server and optuna-dashboard (no-op when up)",
                            description="Start a Ray head, an MLflow tracking server and optuna-dashboard (over "
                                        "the sweeps' Optuna storage) on 127.0.0.1 and write DIR/env.sh with the "
                                        "client environment.")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"stack directory (default {DEFAULT_DIR})")
    p.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard and jobs API port")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI and tracking port")
    p.add_argument("--optuna-port", type=int, default=8080, help="optuna-dashboard port")
    p.add_argument("--optuna-storage", default="",
                   help="Optuna storage URL optuna-dashboard serves (default: MVAR_OPTUNA_STORAGE, else the sweeps' "
                        "sqlite:///out/optuna/optuna.db); no password in it (PGPASSWORD)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs Ray may schedule (default: detected)")
    p.add_argument("--object-store-mb", type=int, default=2000, help="Ray object store size in MB")
    p.add_argument("--auth", choices=AUTH_MODES, default="token",
                   help="Ray token authentication (default token; disabled: anyone on this machine may submit)")
    p.set_defaults(func=run_up)


def run_up(args: argparse.Namespace) -> int:
    flags = (("--ray-port", args.ray_port), ("--dashboard-port", args.dashboard_port),
             ("--mlflow-port", args.mlflow_port), ("--optuna-port", args.optuna_port))
    for flag, value in flags:
        if not 1024 <= value <= 65535:
            raise UserError(f"{flag} must be between 1024 and 65535, got {value}")
    ports = [value for _, value in flags]
    if len(set(ports)) != len(ports):
        raise UserError(f"--ray-port, --dashboard-port, --mlflow-port and --optuna-port must differ, got {ports}")
    if args.object_store_mb < 80:  # Ray refuses object stores below 75 MiB
        raise UserError(f"--object-store-mb must be >= 80, got {args.object_store_mb}")
    spec = StackSpec(dir=args.dir, ray_port=args.ray_port, dashboard_port=args.dashboard_port,
                     mlflow_port=args.mlflow_port, optuna_port=args.optuna_port, optuna_storage=args.optuna_storage,
                     num_cpus=args.num_cpus, num_gpus=args.num_gpus, object_store_mb=args.object_store_mb,
                     auth=args.auth)
    print("\n".join(up(spec)))
    return 0


def run_status(args: argparse.Namespace) -> int:
    services = status(args.dir)
    for s in services:
        state = "running" if s.running else "not running"
        pid = f"pid {s.pid}" if s.pid else "no pid"
        print(f"{s.name:7} {state:12} {s.address or '-'}  {pid}" + (f"  ({s.note})" if s.note else ""))
    return 0 if all(s.running for s in services) else 1


def run_down(args: argparse.Namespace) -> int:
    print("\n".join(down(args.dir)))
    return 0
