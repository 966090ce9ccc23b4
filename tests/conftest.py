"""Shared fixtures: the authors' reference outputs and small models built from them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = REPO.parent / "shared" / "conformance" / "reference_tiny"


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


def _bound_to(ip: str, host: str) -> bool:
    return ip in (host, f"::ffff:{host}")  # an IPv6 socket bound to the v4-mapped address is the same


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

    def foreign(self, host: str = LOOPBACK) -> list[str]:
        return [f"pid {pid} ({cmd}) listens on {ip}:{port}" for (pid, ip, port), cmd in sorted(self.seen.items())
                if not _bound_to(ip, host)]

    def assert_listeners_on(self, host: str = LOOPBACK, expect: tuple[str, ...] = ()) -> None:
        """Every socket seen listens on ``host``; a process whose command line holds each of ``expect``
        was seen listening (so the check looked at the run it means to)."""
        bad = self.foreign(host)
        assert not bad, "listening beyond " + host + ":\n" + "\n".join(bad)
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
