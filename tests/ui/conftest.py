"""Headless Chromium for the UI tests: Debian's chromium + chromium-driver, driven with Selenium.

The browser and its driver come from the distribution (a browser download of a test tool's own
does not work on the project machines): Selenium is given chromedriver's path and the browser's
binary, so Selenium Manager (which would look up and download both) never runs. If they are
missing, the session fixture installs them with apt-get (the tests run as root on the project
machines and in CI); only where apt-get cannot be used are the UI tests skipped, with the reason.

Fixtures for every UI test (and for more pages: a registered model's, a sweep's parent run with
its nested trials): ``browser`` (one Chromium per module), ``mlflow_server`` (a fresh tracking
server), ``optuna_dashboard`` (optuna-dashboard over a tiny study in a SQLite file), and
``artifact_dirs(name)`` (where a page's screenshot and text are kept: ``out/test-artifacts/NAME/``
or ``$MVAR_TEST_ARTIFACTS/NAME/``, and the test's tmp dir); ``Browser.open`` and ``Browser.keep``
load a page until its text shows and keep its screenshot and text.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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


class Browser:
    """One headless Chromium session (Selenium) behind its own chromedriver, both on 127.0.0.1."""

    def __init__(self, chromium: str, chromedriver: str, workdir: Path):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        workdir.mkdir(parents=True, exist_ok=True)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium  # with the driver's path below: no Selenium Manager
        for arg in (*CHROMIUM_ARGS, f"--user-data-dir={workdir / 'profile'}"):
            options.add_argument(arg)
        # chromedriver accepts local connections only; its own process group, so that quit() also
        # ends whatever browser processes it leaves
        self._service = Service(executable_path=chromedriver, log_output=str(workdir / "chromedriver.log"),
                                popen_kw={"start_new_session": True})
        self.driver = webdriver.Chrome(service=self._service, options=options)
        self.driver.set_page_load_timeout(120)
        self.version = self.driver.capabilities.get("browserVersion", "?")

    def get(self, url: str) -> None:
        self.driver.get(url)

    def set_window(self, width: int, height: int) -> None:
        self.driver.set_window_size(width, height)

    def click_if_present(self, css: str, within_text: str = "") -> bool:
        """Click the first element matching ``css`` (inside an ancestor whose text has ``within_text``)."""
        from selenium.webdriver.common.by import By
        for el in self.driver.find_elements(By.CSS_SELECTOR, css):
            if self.run_js("let a = arguments[0]; const w = arguments[1];"
                           "while (a && !(a.innerText || '').includes(w)) a = a.parentElement; return !!a;",
                           el, within_text):
                el.click()
                return True
        return False

    def run_js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def text(self) -> str:
        """The rendered text of the page (what a reader sees, not the HTML source)."""
        return self.run_js("return document.body ? document.body.innerText : '';")

    def wait_for_text(self, needles: list[str], timeout: float = 60.0) -> str:
        """Poll the rendered text until every needle shows; the last text either way."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait
        last = [""]

        def shown(_driver) -> bool:
            last[0] = self.text()
            return all(n in last[0] for n in needles)
        try:
            WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(shown)
        except TimeoutException:
            pass
        return last[0]

    def open(self, url: str, needles: list[str], timeout: float = 90.0) -> str:
        """Load ``url`` and wait until its text holds every needle (the text either way). The first load of
        a single-page app takes 20-30 s on 2 busy cores; MLflow's "MLflow Assistant" side panel, which
        covers a third of the page, is closed when it is there."""
        self.get(url)
        text = self.wait_for_text(needles, timeout=timeout)
        if self.click_if_present('button[aria-label="Close"]', within_text="MLflow Assistant"):
            text = self.wait_for_text(needles, timeout=10)
        return text

    def keep(self, dirs: list[Path], name: str) -> str:
        """Screenshot and rendered text of the page into every artifact dir; the text."""
        text = self.text()
        self.screenshot(*(d / f"{name}.png" for d in dirs))
        for d in dirs:
            (d / f"{name}.txt").write_text(text)
        return text

    def screenshot(self, *paths: Path) -> None:
        png = self.driver.get_screenshot_as_png()
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            if self._service.process is not None:
                stop_process_group(self._service.process)


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
    """One Chromium per UI test module, gone when the module ends: chromedriver listens on ::1 as well,
    and the test process's listener checks of later modules (under `make test`'s two processes, any
    module may follow a UI one) hold everything below it to 127.0.0.1."""
    chromium, chromedriver = chromium_paths
    b = Browser(chromium, chromedriver, tmp_path_factory.mktemp("browser"))
    yield b
    b.quit()


def _wait_health(url: str, proc: subprocess.Popen, log_path: Path, timeout: float, what: str = "mlflow server") -> None:
    """Until ``url`` answers 200; a server that exits or never answers fails the test with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"{what} did not answer {url} within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A fresh MLflow tracking server (SQLite store, local artifacts) on 127.0.0.1; its URL."""
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
        _wait_health(url + "/health", proc, log_path, timeout=240)  # ~25 s idle, longer on 2 busy cores
        yield url
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def artifact_dirs(tmp_path_factory):
    """``artifact_dirs(name)``: the directories a page's screenshots and text go to (kept, and the test's tmp)."""
    def dirs(name: str) -> list[Path]:
        kept = Path(os.environ.get("MVAR_TEST_ARTIFACTS", REPO / "out" / "test-artifacts")) / name
        out = [kept, tmp_path_factory.mktemp(f"{name}-shots")]
        for d in out:
            d.mkdir(parents=True, exist_ok=True)
        return out
    return dirs


@dataclass(frozen=True)
class Dashboard:
    url: str
    storage: str
    study_name: str
    study_id: int
    n_trials: int
    best_number: int
    best_value: float


def _tiny_study(storage: str, name: str, n_trials: int) -> tuple[int, int, float]:
    """A two-parameter study of a known function (seeded sampler): its id, best trial's number and value."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("mvar.test", "ui")
    study.optimize(lambda t: (t.suggest_float("model.lr", 1e-4, 1e-2, log=True) * 100 - 0.3) ** 2
                   + t.suggest_int("model.depth", 1, 4) / 10, n_trials=n_trials)
    return study._study_id, study.best_trial.number, study.best_value


@pytest.fixture(scope="module")
def optuna_dashboard(tmp_path_factory) -> Dashboard:
    """optuna-dashboard on a free loopback port over a tiny study in a fresh SQLite file."""
    root = tmp_path_factory.mktemp("optuna-dashboard")
    storage, name = f"sqlite:///{root / 'optuna.db'}", "ui-tiny-study"
    study_id, best_number, best = _tiny_study(storage, name, n_trials=8)
    port = free_port()
    exe = Path(sys.executable).parent / "optuna-dashboard"
    cmd = [str(exe), storage, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"]
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url + "/api/studies", proc, log_path, timeout=120, what="optuna-dashboard")
        yield Dashboard(url, storage, name, study_id, 8, best_number, best)
    finally:
        stop_process_group(proc)
