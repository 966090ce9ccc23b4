"""Faults a cluster user meets, on real parts: a two-node Ray cluster on this machine, training drivers
started as the user starts them (`python -m workflows.train` with RAY_ADDRESS), real checkpoint files
and a real MLflow store. Each test asserts the figures of docs/reliability.md's fault matrix.

The cluster: a head on 127.0.0.1 and a second node on 127.0.0.2, each with 2 CPUs of its own, joined
with `ray start --address`. Ray binds every socket of a node whose address is exactly 127.0.0.1 to
loopback and, for any other node address, its raylet, agents and the workers' core-worker ports on
all interfaces (a rule in Ray's C++ code, no flag); the second node is given fixed ports for those,
the listener check exempts exactly them and holds everything else to the nodes' loopback addresses.
A node in cluster mode rewrites a head address of "127.0.0.1" to the machine's public address, where
this head does not listen: it joins through the head's IPv4-mapped IPv6 address instead.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from mvar import tracking
from mvar.stack import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP, NODE2_IP = "127.0.0.1", "127.0.0.2"
LOOPBACKS = (HEAD_IP, NODE2_IP)


# --------------------------------------------------------------------------- the two-node cluster

@dataclass
class TwoNodes:
    root: Path
    temp_dir: str
    port: int
    env: dict                                # a driver's environment: RAY_ADDRESS and the token
    node2_ports: set = field(default_factory=set)  # Ray's own all-interface listeners on node 2
    node2_worker_ports: range = range(0)

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster: those naming its temp dir, and all below them."""
        roots = [p for p in psutil.process_iter(["cmdline"]) if _refers_to(p.info["cmdline"] or [], self.temp_dir)]
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                continue
        return list(found.values())

    def raylet(self, ip: str) -> psutil.Process | None:
        for p in self.processes():
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].endswith("raylet") and f"--node_ip_address={ip}" in cmd:
                return p
        return None

    def train_workers_on(self, ip: str) -> list[psutil.Process]:
        raylet = self.raylet(ip)
        return [c for c in (raylet.children() if raylet else []) if "RayTrainWorker" in _cmd(c)]

    def exempt(self, pid: int, ip: str, port: int) -> bool:
        """Ray's own sockets of node 2, which Ray binds on all interfaces (see the module docstring)."""
        return ip in ("0.0.0.0", "::") and (port in self.node2_ports or port in self.node2_worker_ports)


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _refers_to(cmdline: list[str], directory: str) -> bool:
    return any(directory in a for a in cmdline)


def _node_env(token: Path, cluster_mode: bool, dashboard_port: int) -> dict:
    """A node's environment (inherited by its raylet and workers). The state API address is given: Ray
    would otherwise look for it among the machine's GCS processes and find both spellings of the head."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MVAR_LOCAL_RAY")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO),
                "RAY_API_SERVER_ADDRESS": f"http://{HEAD_IP}:{dashboard_port}",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if cluster_mode else "0",
                "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")})
    return env


def _ray_start(args: list[str], env: dict, log: Path) -> None:
    with open(log, "a") as fh:
        subprocess.run([RAY, "start", *args, "--num-cpus=2", "--object-store-memory=200000000",
                        "--disable-usage-stats"], env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=240, check=True)


def _node2_args(c: TwoNodes) -> list[str]:
    ports = {name: free_port() for name in ("node-manager", "object-manager", "metrics-export", "runtime-env-agent",
                                             "dashboard-agent-grpc", "dashboard-agent-listen")}
    c.node2_ports = set(ports.values())
    # a block of 100 worker ports for node 2's workers, from 10100 up: the block 10000-10099 would hold 10001,
    # the Ray client server's default port, which `ray start` refuses to share (failed once in a fresh-clone CI)
    low = free_port() // 100 * 100 % 50000 + 10100
    c.node2_worker_ports = range(low, low + 100)
    return [f"--address=[::ffff:{HEAD_IP}]:{c.port}", f"--node-ip-address={NODE2_IP}",
            *(f"--{name}-port={port}" for name, port in ports.items()),
            f"--min-worker-port={low}", f"--max-worker-port={low + 99}"]


def _end(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)  # Ray's agents may sit on SIGTERM: no need to wait them out
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nodes")
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    temp_dir = f"/tmp/mvar-2n-{secrets.token_hex(4)}"  # short: Ray's unix socket paths must stay < 108 bytes
    c = TwoNodes(root=root, temp_dir=temp_dir, port=free_port(), env={})
    try:
        # the dashboard serves the state API that Ray Train's placement-group cleaner asks on every node
        dashboard = free_port()
        head_env = {**_node_env(token, False, dashboard), "AUTOSCALER_METRIC_PORT": str(free_port()),
                    "DASHBOARD_METRIC_PORT": str(free_port())}
        _ray_start(["--head", f"--node-ip-address={HEAD_IP}", f"--port={c.port}", f"--dashboard-host={HEAD_IP}",
                    f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}"], head_env, root / "head.log")
        _ray_start(_node2_args(c), _node_env(token, True, dashboard), root / "node2.log")
        c.env = {**_node_env(token, False, dashboard), "RAY_ADDRESS": f"{HEAD_IP}:{c.port}"}
        yield c
    finally:
        _end(c.processes())
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- drivers and their runs

@dataclass
class Driver:
    proc: subprocess.Popen
    log: Path
    uri: str
    name: str

    def steps(self) -> list[int]:
        run = _run_of(self.uri, self.name)
        return [m.step for m in tracking.client(self.uri).get_metric_history(run.info.run_id, "train/loss")] \
            if run else []

    def wait_for_step(self, step: int, timeout_s: float = 400) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            seen = self.steps()
            if seen and max(seen) >= step:
                return max(seen)
            time.sleep(0.5)
        raise AssertionError(f"step {step} never logged (exit {self.proc.poll()}):\n{self.text()[-3000:]}")

    def finish(self, timeout_s: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def text(self) -> str:
        return self.log.read_text()


def _run_of(uri: str, name: str):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("tests")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mvar.run_key` LIKE '%/{name}'") if exp else []
    assert len(runs) <= 1, "one MLflow run per training run, whatever happened to it"
    return runs[0] if runs else None


def start_driver(cluster: TwoNodes, inputs, name: str, config: str = "mvar_tiny_local", env: dict | None = None,
                 **overrides) -> Driver:
    args = inputs.overrides(name, **{"run.log_every": 1, **overrides})
    log = inputs.root / f"{name}-{time.monotonic_ns()}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "workflows.train", "--config", f"workflows/configs/{config}.yaml",
                                 *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**cluster.env, "PYTHONUNBUFFERED": "1", **(env or {})})
    return Driver(proc, log, inputs.tracking_uri, name)


def run_dir(inputs, name: str) -> Path:
    return inputs.root / "runs" / name


def snapshot(inputs, name: str) -> dict:
    return json.loads((run_dir(inputs, name) / "checkpoint_manager_snapshot.json").read_text())


def checkpoint_dirs(inputs, name: str) -> list[str]:
    """Every directory in the run's storage (complete, partial or unregistered checkpoints)."""
    return sorted(p.name for p in run_dir(inputs, name).iterdir() if p.is_dir())


def registered(inputs, name: str) -> list[str]:
    return [r["checkpoint_dir_name"] for r in snapshot(inputs, name)["checkpoint_results"]]


# --------------------------------------------------------------------------- the tests

def test_eight_workers_survive_a_kill_in_the_middle_of_a_checkpoint(two_nodes, tiny_inputs, listeners, step_tally,
                                                                    tmp_path):
    """The cluster configs' world size (8 workers, fractional CPUs, spread over both nodes). Rank 0 is
    SIGKILLed while it writes the checkpoint of step 20, after the model file and before the rename
    (MVAR_FAULT): the worker group restarts from step 10, the partial directory is removed, and so are
    the leftovers an earlier attempt left in the run's storage (an unregistered step_N, a partial one)."""
    name, steps = "eight", 30
    storage = run_dir(tiny_inputs, name)
    for leftover in ("step_00000007", ".step_00000005.partial-0badc0de"):  # what a killed earlier attempt leaves
        (storage / leftover).mkdir(parents=True)
        (storage / leftover / "model.pt").write_bytes(b"half a file")
    fault = {"MVAR_FAULT": "abort-after-model-file@20", "MVAR_FAULT_ONCE": str(tmp_path / "fired")}
    with listeners.Watch(lambda: [p.pid for p in two_nodes.processes()], interval_s=1.0) as watch:
        driver = start_driver(two_nodes, tiny_inputs, name, env=fault, **{
            "run.steps": steps, "run.checkpoint_every": 10, "run.max_failures": 1, "data.batch_size": 4,
            "scaling.num_workers": 8, "scaling.cpus_per_worker": 0.2, "scaling.placement_strategy": "SPREAD"})
        rc = driver.finish()
    text = driver.text()
    assert rc == 0, text[-4000:]
    assert (tmp_path / "fired").exists() and "fault injected" in text
    assert "resumed at step 10" in text
    run = _run_of(tiny_inputs.tracking_uri, name)
    step_tally.of_run(tiny_inputs.tracking_uri, run.info.run_id, range(1, steps + 1), samples_per_step=32).assert_clean()
    ranks = json.loads(run.data.tags["mvar.steps_by_rank"])  # [first, last, batches drawn] of the last attempt
    assert len(ranks) == 8 and all(r == [11, steps, steps - 10] for r in ranks), ranks
    losses = [m.value for m in sorted(tracking.client(tiny_inputs.tracking_uri).get_metric_history(
        run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, f"loss did not fall: {losses[:5]} .. {losses[-5:]}"
    # only what Ray keeps (run.keep_checkpoints: 2) is left: no partial, no unregistered directory
    assert checkpoint_dirs(tiny_inputs, name) == registered(tiny_inputs, name) == ["step_00000020", "step_00000030"]
    watch.assert_listeners_on(LOOPBACKS, expect=("RayTrainWorker", "raylet"), exempt=two_nodes.exempt)



# --------------------------------------------------------------------------- a full disk

def checkpoint_bytes(inputs, tmp: Path) -> int:
    """What one checkpoint of the tiny run takes: one written here (optimizer state filled), measured."""
    import torch

    from mvar.training.config import load_train_config
    from mvar.training.loop import build_task
    from mvar.training.trainer import Trainer
    cfg = load_train_config("workflows/configs/mvar_tiny_local.yaml", inputs.overrides("size"))
    trainer = Trainer(build_task(cfg, torch.device("cpu"), 0, 1), cfg, torch.device("cpu"))
    for p in trainer.stepper.params:
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()  # Adam's moments exist from the first step on
    out = trainer.save(tmp / "ckpt", 1)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def test_a_full_disk_at_a_checkpoint_stops_the_run_and_keeps_the_last_good_one(two_nodes, tiny_inputs, step_tally,
                                                                              tmp_path, disk_full, small_disk):
    """Storage with room for one checkpoint and a half: the checkpoint of step 20 meets ENOSPC. Every
    rank stops there (no retries: they would fill the disk again) with one line naming the checkpoint
    and the last complete one; nothing partial is left. With room again, the same command resumes."""
    name, storage = "disk-full", tmp_path / "storage"
    keys = {"run.steps": 20, "run.checkpoint_every": 10, "run.storage_path": storage, "run.max_failures": 2}
    env = {}
    if disk_full == "tmpfs":
        small_disk.mount(storage, int(1.5 * checkpoint_bytes(tiny_inputs, tmp_path)) + (1 << 20))
    else:
        env = {"MVAR_FAULT": "enospc-checkpoint@20"}
    driver = start_driver(two_nodes, tiny_inputs, name, env=env, **keys)
    rc, text = driver.finish(), driver.text()
    assert rc == 2, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("workflows.train: error:")]
    assert len(errors) == 1, text[-4000:]
    last = errors[0]
    assert last.startswith("workflows.train: error: training stopped at the checkpoint of step 20: no space "
                           f"left on the device of '{storage / name}' while writing 'step_00000020'"), last
    assert last.endswith(f"the last complete checkpoint is {storage / name / 'step_00000010'}: free space "
                         "and rerun the same command to resume from it"), last
    assert snap_latest(storage / name) == "step_00000010"
    assert sorted(p.name for p in (storage / name).iterdir() if p.is_dir()) == ["step_00000010"]
    run = _run_of(tiny_inputs.tracking_uri, name)
    assert run.info.status == "FAILED"
    step_tally.of_run(tiny_inputs.tracking_uri, run.info.run_id, range(1, 21)).assert_clean()

    if disk_full == "tmpfs":
        small_disk.grow(storage, 200 << 20)
    rerun = start_driver(two_nodes, tiny_inputs, name, **keys)
    assert rerun.finish() == 0, rerun.text()[-4000:]
    assert "resumed at step 10" in rerun.text()
    step_tally.of_run(tiny_inputs.tracking_uri, run.info.run_id, range(1, 21), samples_per_step=32).assert_clean()
    assert snap_latest(storage / name) == "step_00000020"


def snap_latest(directory: Path) -> str:
    return json.loads((directory / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"][
        "checkpoint_dir_name"]


def test_node_loss_resumes_on_the_node_left(two_nodes, tiny_inputs, step_tally):
    """A 2-worker run, one worker per node (SPREAD). The second node's raylet and worker are SIGKILLed mid-run: the
    worker group restarts from the last checkpoint on the head alone and ends at run.steps. (A damaged
    resume point, passed over for the one before: tests/training/test_train.py, the mvar case.)"""
    name, steps = "node-loss", 40
    keys = {"run.checkpoint_every": 10, "run.max_failures": 2, "scaling.placement_strategy": "SPREAD"}
    driver = start_driver(two_nodes, tiny_inputs, name, **{"run.steps": steps, **keys})
    driver.wait_for_step(15)
    on_head, on_node2 = two_nodes.train_workers_on(HEAD_IP), two_nodes.train_workers_on(NODE2_IP)
    assert len(on_head) == len(on_node2) == 1, "SPREAD puts one worker on each node"
    # the node goes, its processes with it: the raylet and the train worker it hosts (a worker outliving a
    # SIGKILLed raylet could finish its last 25 steps before Ray declared the node dead: 2 of 3 runs here)
    two_nodes.raylet(NODE2_IP).kill()
    for worker in on_node2:
        worker.kill()
    rc = driver.finish()
    assert rc == 0, driver.text()[-4000:]
    assert two_nodes.raylet(NODE2_IP) is None and "resumed at step" in driver.text()
    run = _run_of(tiny_inputs.tracking_uri, name)
    step_tally.of_run(tiny_inputs.tracking_uri, run.info.run_id, range(1, steps + 1), samples_per_step=32).assert_clean()
    ranks = json.loads(run.data.tags["mvar.steps_by_rank"])
    assert len(ranks) == 2 and ranks[0] == ranks[1] and ranks[0][1] == steps, ranks
    assert checkpoint_dirs(tiny_inputs, name) == registered(tiny_inputs, name) == ["step_00000030", "step_00000040"]
