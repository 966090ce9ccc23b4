"""Headless Chromium for the UI tests: Debian's chromium + chromium-driver, driven over W3C WebDriver.

The browser comes from the distribution (a browser download of a test tool's own does not work
on the project machines). If it is missing, the session fixture installs it with apt-get (the
tests run as root on the project machines and in CI); only where apt-get cannot be used are
the UI tests skipped, with the reason.

The WebDriver client below speaks the W3C protocol to chromedriver over plain HTTP (urllib),
so the tests need no Python package beyond the standard library.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
APT_PACKAGES = ["chromium", "chromium-driver"]
# Headless on a machine with no screen, no GPU and no outside network: without the
# background-networking flags Chromium keeps dialling Google's hosts, which this network refuses.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions", "--window-size=1600,1000",
]


def _installed() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages when missing."""
    if _installed():
        return CHROMIUM, CHROMEDRIVER
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing and no apt-get to install {' '.join(APT_PACKAGES)}")
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} / {CHROMEDRIVER} missing; installing them needs root: "
                    f"apt-get install -y {' '.join(APT_PACKAGES)}")
    install = ("install", "-y", "--no-install-recommends", *APT_PACKAGES)
    result = _apt(*install, timeout=900)
    if result.returncode != 0:  # usually a stale or missing package list
        _apt("update", timeout=600)
        result = _apt(*install, timeout=900)
    if result.returncode != 0 or not _installed():
        pytest.fail(f"apt-get install {' '.join(APT_PACKAGES)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return CHROMIUM, CHROMEDRIVER


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:  # WebDriver errors come as JSON bodies with 4xx/5xx
        detail = err.read().decode(errors="replace")[:2000]
        raise RuntimeError(f"{method} {url}: HTTP {err.code}: {detail}") from None


class Browser:
    """One headless Chromium session behind its own chromedriver, both on 127.0.0.1."""

    def __init__(self, chromium: str, chromedriver: str, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # chromedriver accepts local connections only unless --allowed-ips is given; its own
        # process group, so that quit() also ends the browser processes it started
        with open(workdir / "chromedriver.log", "w") as log:
            self._driver = subprocess.Popen([chromedriver, f"--port={self.port}"], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"
        self.session = ""
        self._wait_driver()
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium, "args": [*CHROMIUM_ARGS, f"--user-data-dir={workdir / 'profile'}"]}}
        value = http_json("POST", f"{self.base}/session", {"capabilities": {"alwaysMatch": caps}}, timeout=120)["value"]
        self.session = value["sessionId"]
        self.version = value["capabilities"].get("browserVersion", "?")

    def _wait_driver(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._driver.poll() is not None:
                raise RuntimeError(f"chromedriver exited with {self._driver.returncode}")
            try:
                if http_json("GET", f"{self.base}/status", timeout=5)["value"].get("ready"):
                    return
            except (OSError, RuntimeError, KeyError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"chromedriver did not answer on {self.base} within {timeout:.0f} s")

    def _cmd(self, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
        return http_json(method, f"{self.base}/session/{self.session}{path}", body, timeout)["value"]

    def get(self, url: str) -> None:
        self._cmd("POST", "/url", {"url": url}, timeout=120)

    def set_window(self, width: int, height: int) -> None:
        self._cmd("POST", "/window/rect", {"width": width, "height": height})

    def click_if_present(self, css: str, within_text: str = "") -> bool:
        """Click the first element matching ``css`` (inside an ancestor whose text has ``within_text``)."""
        return self.run_js(
            "const [css, within] = arguments;"
            "for (const el of document.querySelectorAll(css)) {"
            "  let a = el; while (a && !(a.innerText || '').includes(within)) a = a.parentElement;"
            "  if (a) { el.click(); return true; }"
            "} return false;", css, within_text)

    def run_js(self, script: str, *args):
        return self._cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def text(self) -> str:
        """The rendered text of the page (what a reader sees, not the HTML source)."""
        return self.run_js("return document.body ? document.body.innerText : '';")

    def wait_for_text(self, needles: list[str], timeout: float = 60.0) -> str:
        """Poll the rendered text until every needle shows; the last text either way."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles) or time.monotonic() > deadline:
                return text
            time.sleep(0.5)

    def screenshot(self, *paths: Path) -> None:
        png = base64.b64decode(self._cmd("GET", "/screenshot"))
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)

    def quit(self) -> None:
        try:
            if self.session:
                self._cmd("DELETE", "", timeout=30)
        except (OSError, RuntimeError):
            pass
        finally:
            stop_process_group(self._driver)


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group started for ``proc`` (e.g. chromedriver and its browser), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def chromium_paths() -> tuple[str, str]:
    return ensure_chromium()


@pytest.fixture(scope="module")
def browser(chromium_paths, tmp_path_factory):
    chromium, chromedriver = chromium_paths
    b = Browser(chromium, chromedriver, tmp_path_factory.mktemp("browser"))
    yield b
    b.quit()


def _wait_health(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow server did not answer {url}/health within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A fresh MLflow tracking server (SQLite store, local artifacts) on 127.0.0.1; its URL."""
    import sys
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--default-artifact-root", str(root / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # no GenAI job runner (7 extra processes) and no telemetry on a closed network
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc, log_path, timeout=240)  # ~25 s idle, longer on 2 busy cores
        yield url
    finally:
        stop_process_group(proc)
