"""Shared fixtures: the authors' reference outputs and small models built from them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = REPO.parent / "shared" / "conformance" / "reference_tiny"

# `make test` runs two pytest processes (pytest-xdist) on a 2-core machine: each keeps torch, and what it
# starts (drivers, benchmarks; Ray sets its own workers' threads), to one thread. Two OpenMP threads per
# process spin on the cores the other process needs: in-process torch tests ran up to 7x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The longest files (minutes each, mostly Ray Train starts), longest first: collected first, so that
# pytest-xdist hands them out first and the two processes end together, instead of one running the
# longest file alone at the end.
LONGEST_FIRST = ("training/test_train_faults.py", "sweeps/test_sweep.py", "workflows/test_quickstart.py",
                 "training/test_train.py", "training/test_train_tokenizer.py", "test_stack.py",
                 "training/test_train_job.py", "sweeps/test_sweep_postgres.py", "evaluation/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        rel = Path(str(item.fspath)).resolve().relative_to(REPO / "tests").as_posix()
        return LONGEST_FIRST.index(rel) if rel in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


def reference_dir() -> Path:
    """MVAR_REFERENCE_DIR when set, else the tiny reference set beside the repository."""
    return Path(os.environ.get("MVAR_REFERENCE_DIR", DEFAULT_REFERENCE_DIR))


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    path = reference_dir()
    if not (path / "config.json").is_file():
        pytest.fail(f"reference outputs not found in {path}: set MVAR_REFERENCE_DIR")
    return path


@pytest.fixture(scope="session")
def ref_config(ref_dir) -> dict:
    return json.loads((ref_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def ref_expected(ref_dir) -> dict[str, torch.Tensor]:
    out = torch.load(ref_dir / "expected.pt", weights_only=True)
    mvar_file = ref_dir / "expected_mvar.pt"
    if mvar_file.is_file():
        out.update(torch.load(mvar_file, weights_only=True))
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# -- listening sockets -------------------------------------------------------------------

LOOPBACK = "127.0.0.1"


def _bound_to(ip: str, hosts) -> bool:
    """``ip`` is one of ``hosts`` (an IPv6 socket bound to the v4-mapped address is the same)."""
    hosts = (hosts,) if isinstance(hosts, str) else tuple(hosts)
    return any(ip in (host, f"::ffff:{host}") for host in hosts)


class ListenerWatch:
    """Samples, in a thread, the listening TCP sockets of a set of processes while a run is live.

    ``pids()`` says which processes to look at on each sample (e.g. this process and its descendants:
    a local Ray, its workers, subprocess drivers). Everything seen is kept, so a socket that lived for
    one second of a run is still checked at the end.
    """

    def __init__(self, pids, interval_s: float = 0.5):
        import threading
        self.pids, self.interval_s = pids, interval_s
        self.seen: dict[tuple[int, str, int], str] = {}  # (pid, ip, port) -> command line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listener-watch", daemon=True)

    def sample(self) -> None:
        import psutil
        wanted = set(self.pids())
        for conn in psutil.net_connections("inet"):
            if conn.status != psutil.CONN_LISTEN or conn.pid not in wanted:
                continue
            key = (conn.pid, conn.laddr.ip, conn.laddr.port)
            if key not in self.seen:
                try:
                    self.seen[key] = " ".join(psutil.Process(conn.pid).cmdline())[:200]
                except psutil.Error:
                    self.seen[key] = "?"

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a process that ends mid-sample; the next sample goes on
                continue

    def __enter__(self) -> "ListenerWatch":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def foreign(self, host=LOOPBACK, exempt=None) -> list[str]:
        """The sockets seen bound to none of ``host`` (one address or several), leaving out those
        ``exempt(pid, ip, port)`` says are known exceptions."""
        return [f"pid {pid} ({cmd}) listens on {ip}:{port}" for (pid, ip, port), cmd in sorted(self.seen.items())
                if not _bound_to(ip, host) and not (exempt and exempt(pid, ip, port))]

    def assert_listeners_on(self, host=LOOPBACK, expect: tuple[str, ...] = (), exempt=None) -> None:
        """Every socket seen listens on ``host`` (or one of several hosts) unless ``exempt``; a process
        whose command line holds each of ``expect`` was seen listening (so the check looked at the run
        it means to)."""
        bad = self.foreign(host, exempt)
        where = host if isinstance(host, str) else ", ".join(host)
        assert not bad, "listening beyond " + where + ":\n" + "\n".join(bad)
        for word in expect:
            assert any(word in cmd for cmd in self.seen.values()), \
                f"no listening process with '{word}' seen; saw: {sorted(set(self.seen.values()))}"


def descendant_pids() -> list[int]:
    """This process and every process below it (a local Ray's GCS, raylet, workers; subprocess drivers)."""
    import psutil
    me = psutil.Process()
    return [me.pid, *(p.pid for p in me.children(recursive=True))]


class Listeners:
    """What the `listeners` fixture gives tests: watches and a one-shot check."""

    Watch = ListenerWatch

    @staticmethod
    def of_descendants(interval_s: float = 0.5) -> ListenerWatch:
        return ListenerWatch(descendant_pids, interval_s)

    @staticmethod
    def assert_listeners_on(pids, host: str = LOOPBACK, expect: tuple[str, ...] = ()) -> None:
        watch = ListenerWatch(lambda: pids)
        watch.sample()
        watch.assert_listeners_on(host, expect)


@pytest.fixture(scope="session")
def listeners() -> type[Listeners]:
    return Listeners


# -- lost and duplicated steps (the figures of docs/reliability.md's fault matrix) ---------------

class StepTally:
    """The steps a run logged for one metric against those it should have logged exactly once."""

    def __init__(self, expected, logged, samples_per_step: int = 0):
        self.expected, self.logged, self.samples_per_step = list(expected), list(logged), samples_per_step

    @property
    def lost(self) -> list[int]:
        return sorted(set(self.expected) - set(self.logged))

    @property
    def duplicated(self) -> list[int]:
        return sorted({s for s in self.logged if self.logged.count(s) > 1})

    @property
    def unexpected(self) -> list[int]:
        return sorted(set(self.logged) - set(self.expected))

    @property
    def samples_lost(self) -> int:
        """Samples never trained on: the data position is the step, each step draws a global batch."""
        return len(self.lost) * self.samples_per_step

    def figures(self) -> str:
        return (f"steps: {len(self.lost)} lost, {len(self.duplicated)} duplicated; "
                f"samples: {self.samples_lost} lost (of {len(self.expected)} steps)")

    def assert_clean(self) -> str:
        """0 lost, 0 duplicated, nothing beyond the expected steps; returns the figures."""
        assert not (self.lost or self.duplicated or self.unexpected), (
            f"{self.figures()}; lost {self.lost[:10]}, duplicated {self.duplicated[:10]}, "
            f"unexpected {self.unexpected[:10]}")
        return self.figures()


class Tally:
    """What the `step_tally` fixture gives tests: the tally of a training run found in MLflow."""

    StepTally = StepTally

    @staticmethod
    def of_run(uri: str, run_id: str, steps, key: str = "train/loss", samples_per_step: int = 0) -> StepTally:
        from mvar import tracking
        logged = [m.step for m in tracking.client(uri).get_metric_history(run_id, key)]
        return StepTally(steps, logged, samples_per_step)


@pytest.fixture(scope="session")
def step_tally() -> type[Tally]:
    return Tally


# -- a full disk: a small tmpfs where the machine lets tests mount one, else ENOSPC injected -------

def _mount_tmpfs(path: Path, size: int, remount: bool = False) -> bool:
    import subprocess
    path.mkdir(parents=True, exist_ok=True)
    opts = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                          check=False).returncode == 0


_TMPFS_ALLOWED: list[bool] = []


def tmpfs_allowed() -> bool:
    """Whether this machine lets the tests mount a tmpfs (root, no container policy against it): probed once."""
    if not _TMPFS_ALLOWED:
        import shutil
        import subprocess
        import tempfile
        probe = Path(tempfile.mkdtemp(prefix="mvar-tmpfs-probe-"))
        ok = shutil.which("mount") is not None and _mount_tmpfs(probe, 1 << 20)
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        probe.rmdir()
        _TMPFS_ALLOWED.append(ok)
    return _TMPFS_ALLOWED[0]


def pytest_generate_tests(metafunc):
    """A test taking ``disk_full`` runs once, named after how it fills the disk: ``tmpfs`` (a real full
    disk) where the machine allows it, else ``injected-enospc`` (MVAR_FAULT at the same write);
    MVAR_TESTS_DISK_FULL=injected-enospc picks the second anyway."""
    if "disk_full" in metafunc.fixturenames:
        forced = os.environ.get("MVAR_TESTS_DISK_FULL", "")
        metafunc.parametrize("disk_full", [forced or ("tmpfs" if tmpfs_allowed() else "injected-enospc")])


class SmallDisk:
    """Small tmpfs mounts for one test, unmounted at its end."""

    def __init__(self):
        self.mounts: list[Path] = []

    def mount(self, path: Path, size: int) -> Path:
        assert _mount_tmpfs(path, size), f"mount -t tmpfs at {path} failed"
        self.mounts.append(path)
        return path

    def grow(self, path: Path, size: int) -> None:
        assert _mount_tmpfs(path, size, remount=True), f"remount of {path} failed"

    def unmount_all(self) -> None:
        import subprocess
        for path in reversed(self.mounts):
            subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def small_disk():
    disk = SmallDisk()
    try:
        yield disk
    finally:
        disk.unmount_all()

# -- tiny training inputs (the training tests, and the UI test's training run) -----------------------

@dataclass
class TinyInputs:
    root: Path
    tokenizer: str
    images: str
    tokens: str
    eval_tokens: str

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def overrides(self, name: str, **extra) -> list[str]:
        """Overrides that point a tiny local config at these inputs and at a store under ``root``."""
        base = {"tokenizer": self.tokenizer, "data.shards": self.tokens, "run.name": name,
                "run.storage_path": str(self.root / "runs"), "tracking.uri": self.tracking_uri,
                "tracking.experiment": "tests", "tracking.system_metrics": "false", "data.num_workers": 0}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> TinyInputs:
    """A stand-in tiny tokenizer (seeded random weights), 160 + 32 synthetic 64 px images of 10 classes and
    their token shards."""
    from mvar.checkpoint import save_tokenizer
    from mvar.data.synth import write_synth
    from mvar.data.tokens import tokenize
    from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    cfg = TokenizerConfig.tiny()
    save_tokenizer(root / "tokenizer", MultiScaleVQVAE(cfg), cfg)
    write_synth(str(root / "images"), num_images=160, image_size=64, num_classes=10, seed=0, shard_size=40)
    write_synth(str(root / "eval-images"), num_images=32, image_size=64, num_classes=10, seed=1, shard_size=16)
    tokenize(str(root / "tokenizer"), str(root / "images"), str(root / "tokens"), progress=False)
    tokenize(str(root / "tokenizer"), str(root / "eval-images"), str(root / "eval-tokens"), progress=False)
    return TinyInputs(root=root, tokenizer=str(root / "tokenizer"), images=str(root / "images"),
                      tokens=str(root / "tokens"), eval_tokens=str(root / "eval-tokens"))


@pytest.fixture(scope="session")
def tiny_classifier(tiny_inputs) -> str:
    """The classifier feature extractor (`mvar eval train-classifier`) of tiny_inputs' training images, a few
    seconds' training: what a checkpoint's evaluation (FID, class accuracy) needs without Inception's weights."""
    from mvar.cli import main as mvar_main
    out = tiny_inputs.root / "classifier" / "classifier.pt"
    if not out.with_suffix(".yaml").is_file():  # its .yaml is written after the .pt
        assert mvar_main(["eval", "train-classifier", "--shards", tiny_inputs.images, "--out", str(out),
                          "--steps", "30", "--batch-size", "40", "--threads", "1"]) == 0
    return str(out)


def checkpoint_eval_overrides(inputs: TinyInputs, classifier: str, **extra) -> dict:
    """The `checkpoint_eval.*` keys of a tiny run: its checkpoints scored with the classifier against the
    training images, 4 samples per class (40), in one batch."""
    return {"checkpoint_eval.every_checkpoint": "true", "checkpoint_eval.reference": inputs.images,
            "checkpoint_eval.feature_extractor": "classifier", "checkpoint_eval.feature_extractor_weights": classifier,
            "checkpoint_eval.num_per_class": 4, "checkpoint_eval.batch_size": 40, "checkpoint_eval.isc_splits": 2,
            "checkpoint_eval.feature_batch_size": 40, "checkpoint_eval.cpus_per_worker": 0.5,
            "checkpoint_eval.device": "cpu", **extra}


@pytest.fixture(scope="session")
def checkpoint_eval_keys():
    """``checkpoint_eval_keys(tiny_inputs, tiny_classifier, **extra)``: overrides for a run whose checkpoints
    are evaluated."""
    return checkpoint_eval_overrides

