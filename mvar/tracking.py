"""Run tracking behind one small interface; MLflow is the implementation, and this is the only
module of the project that imports it.

Two parts. A ``Store`` is the driver's side of one tracking store: it finds a run again by its
key tags or makes it (``find_or_create``), nests runs (``children``), reads params, tags and metric
histories (``get``, ``history``), sets tags, ends runs (``terminate``) and keeps registered models
(``register_model``, ``set_alias``, ``resolve_model`` of ``models:/NAME@ALIAS``). What it returns
is the project's (``RunRecord``), never MLflow's entities.

Workers log through a ``Tracker``: ``log_params``, ``set_tags``,
``log_metrics(metrics, step)``, ``log_artifact``, ``log_text``, ``log_image(image, key, step)``,
``log_table``, ``close``.
Rank 0 gets an ``MlflowTracker`` bound to one run id; the first rank of every other node a
``NodeTracker`` (its node's system metrics only); other ranks a ``NullTracker``. System metrics go
through MLflow's public API (``SystemMetrics``), one sampler per node, named ``system/node_<N>/...``.
Metrics and artifacts are sent by a background thread that retries, so a tracking server that goes
away mid-run costs log lines, not the training job; what is still queued when the run closes is
flushed with a bounded wait.

Where runs go (``TrackingConfig.uri``, else ``MLFLOW_TRACKING_URI``, else a
SQLite store under ``out/mlflow`` of the working directory). For a SQLite
store the experiment's artifacts live beside the database, never in the
working directory (which a Ray job deletes with its session).
"""
from __future__ import annotations

import contextlib
import getpass
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvar.config import check, flatten
from mvar.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_STORE = "out/mlflow"


@dataclass
class TrackingConfig:
    uri: str = ""                 # '' = MLFLOW_TRACKING_URI, else sqlite under out/mlflow
    experiment: str = "mvar"
    run_name: str = ""            # '' = the training run's name
    parent_run_id: str = ""       # a training run nested under this run (a sweep's trial under the sweep's run)
    system_metrics: bool = True   # MLflow's CPU/GPU/memory sampler, one per node: system/node_<N>/*
    system_metrics_interval_s: float = 10.0
    # a registered generator version holds an MLflow pyfunc, a copy of its weights and tokenizer (no optimizer
    # state): mlflow.pyfunc.load_model("models:/NAME@final"); false: it only names the checkpoint (no copy)
    register_pyfunc: bool = True
    retry_s: float = 600.0        # how long queued metrics wait for a server that went away
    flush_timeout_s: float = 60.0  # how long close() waits for the queue to drain

    def validate(self, prefix: str = "") -> None:
        check(bool(self.experiment), prefix + "experiment", "must not be empty")
        check(self.system_metrics_interval_s > 0, prefix + "system_metrics_interval_s", "must be > 0")
        check(self.retry_s >= 0, prefix + "retry_s", "must be >= 0")


def resolve_uri(uri: str = "") -> str:
    """An absolute tracking URI that every process of the run (and a Ray job) shares."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        store = Path(DEFAULT_STORE).resolve()
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()  # relative sqlite path -> absolute
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:
        raise UserError(f"tracking URI '{uri}' has no scheme; use http://HOST:PORT or sqlite:////ABS/PATH.db")
    return uri


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store: an absolute artifact folder beside the database."""
    if uri.startswith("sqlite:///"):
        return "file://" + str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def client(uri: str = ""):
    """MLflow's own client on the store: for tests and ad-hoc inspection. The project goes through ``Store``."""
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=resolve_uri(uri))


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's commit (with '-dirty' when files differ), or 'unknown' outside git."""
    cwd = cwd or Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return os.environ.get("MVAR_GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MVAR_GIT_COMMIT", "unknown")


def source_name(argv: list[str] | None = None) -> str:
    """What started this process, as MLflow's Source column shows it: ``mvar train``, ``workflows/train.py``
    (a module of this checkout, by its path in it), else the program's file name."""
    argv = sys.argv if argv is None else argv
    if not argv or not argv[0]:
        return "python"
    prog = Path(argv[0])
    root = Path(__file__).resolve().parents[1]
    if prog.name == "mvar" or prog.resolve() == root / "mvar" / "cli.py":
        return f"mvar {argv[1]}" if len(argv) > 1 and not argv[1].startswith("-") else "mvar"
    try:
        return str(prog.resolve().relative_to(root))
    except ValueError:
        return prog.name


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return os.environ.get("USER", "unknown")


def source_tags() -> dict[str, str]:
    """MLflow's source tags (the UI's Source, Version and User columns) and ``mvar.git_commit`` (with
    '-dirty' when the checkout differs from its commit; MLflow's commit tag is the bare hash)."""
    from mvar import cluster  # cluster imports nothing of tracking at module level
    commit = git_commit()
    return {"mlflow.source.name": source_name(), "mlflow.source.type": "JOB" if cluster.in_ray_job() else "LOCAL",
            "mlflow.source.git.commit": commit.removesuffix("-dirty"), "mlflow.user": _user(),
            "mvar.git_commit": commit}


PARENT_TAG = "mlflow.parentRunId"   # MLflow's nesting: the UI shows such a run under its parent
CHECKPOINT_TAG = "mvar.checkpoint"   # a training run's final checkpoint; a model version's checkpoint


@dataclass(frozen=True)
class RunRecord:
    """What the project reads of a run: MLflow's entities stay inside this module."""

    run_id: str
    name: str
    status: str                  # RUNNING | FINISHED | FAILED | KILLED
    experiment_id: str
    start_time: int              # ms since the epoch
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]    # the latest value of each key
    artifact_uri: str


@dataclass(frozen=True)
class DatasetRecord:
    """A data set a run read (MLflow's Datasets column and panel): ``context`` is training or evaluation."""

    name: str
    digest: str                  # same data, same digest (from the shards' sha256 values)
    source: str                  # where it lies (directory or URL)
    profile: dict[str, Any]      # counts, classes ...
    context: str = "training"


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name, run.info.status, run.info.experiment_id,
                     run.info.start_time, dict(run.data.params), dict(run.data.tags), dict(run.data.metrics),
                     run.info.artifact_uri)


def _tag_query(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


class Store:
    """One MLflow tracking store: experiments, runs found by their tags or made, their params, tags,
    metric histories and end, nested runs, and registered models. The driver side of every workflow
    (training's launch, evaluation, sweeps, the report) goes through it; workers log through a Tracker."""

    def __init__(self, uri: str = ""):
        self.uri = resolve_uri(uri)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # -- experiments -----------------------------------------------------------------------
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """The id of experiment ``name``; created (artifacts beside a SQLite store) if missing and ``create``."""
        c = self.client
        try:
            exp = c.get_experiment_by_name(name)
            if exp is not None or not create:
                return exp.experiment_id if exp is not None else None
            root = _artifact_root(self.uri)
            # the kind makes MLflow 3's UI open the experiment on its runs (not the GenAI overview)
            return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                       tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception as err:
            if type(err).__name__ == "RestException" and "RESOURCE_ALREADY_EXISTS" in str(err):
                return c.get_experiment_by_name(name).experiment_id  # created concurrently
            raise UserError(f"MLflow tracking store '{self.uri}' does not answer ({type(err).__name__}: {err}); "
                            "start it (`mvar stack up`) or set tracking.uri / MLFLOW_TRACKING_URI") from err

    def check(self, experiment: str) -> None:
        """The store answers (a UserError naming it if not), and nothing is made in it: a SQLite store is a
        file MLflow creates on first use (its folder exists: ``resolve_uri`` made it), a server is asked."""
        if not self.uri.startswith("sqlite:"):
            self.experiment_id(experiment, create=False)

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    # -- runs ----------------------------------------------------------------------------------
    def create_run(self, experiment: str, name: str, tags: dict[str, str] | None = None,
                   parent: str | None = None) -> str:
        """A new run of ``experiment`` (MLflow's source tags and the checkout's commit tagged), nested under
        ``parent`` if given. The one place the project makes runs."""
        all_tags = {**source_tags(), **(tags or {})}
        if parent:
            all_tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id(experiment), run_name=name, tags=all_tags).info.run_id

    def find_run(self, experiment: str, tags: dict[str, str], oldest: bool = False) -> str | None:
        """The newest (or ``oldest``) run of ``experiment`` carrying all of ``tags``; None if none."""
        exp = self.experiment_id(experiment, create=False)
        if exp is None:
            return None
        found = self.client.search_runs([exp], filter_string=_tag_query(tags), max_results=1,
                                        order_by=[f"attributes.start_time {'ASC' if oldest else 'DESC'}"])
        return found[0].info.run_id if found else None

    def find_or_create(self, experiment: str, key: dict[str, str], name: str, tags: dict[str, str] | None = None,
                       parent: str | None = None, oldest: bool = False) -> tuple[str, bool]:
        """(run id, found?): the run whose tags hold ``key`` (a rerun of the same command finds it), else a
        new one tagged ``key`` and ``tags``."""
        query = {**key, **({PARENT_TAG: parent} if parent else {})}
        found = self.find_run(experiment, query, oldest)
        if found:
            return found, True
        return self.create_run(experiment, name, {**(tags or {}), **key}, parent), False

    def children(self, parent: str, tags: dict[str, str] | None = None) -> list[str]:
        """The runs nested under ``parent`` (and carrying ``tags``), oldest first."""
        exp = self.get(parent).experiment_id
        found = self.client.search_runs([exp], filter_string=_tag_query({PARENT_TAG: parent, **(tags or {})}),
                                        order_by=["attributes.start_time ASC"])
        return [r.info.run_id for r in found]

    def runs(self, experiment: str, max_results: int = 5000) -> list[RunRecord]:
        """Every run of ``experiment``; a UserError when there is no such experiment."""
        exp = self.experiment_id(experiment, create=False)
        if exp is None:
            raise UserError(f"no MLflow experiment '{experiment}' in {self.uri}")
        return [_record(r) for r in self.client.search_runs([exp], max_results=max_results)]

    def get(self, run_id: str) -> RunRecord:
        """The run ``run_id``; a UserError naming the store when it is not there."""
        try:
            return _record(self.client.get_run(run_id))
        except Exception as err:  # unknown, deleted or an unreachable store: one message
            raise UserError(f"MLflow run '{run_id}' not found in {self.uri} ({type(err).__name__}: "
                            f"{str(err)[:200]})") from err

    def exists(self, run_id: str) -> bool:
        try:
            self.get(run_id)
            return True
        except UserError:
            return False

    def set_tags(self, run_id: str, tags: dict[str, object]) -> None:
        from mlflow.entities import RunTag
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_inputs(self, run_id: str, datasets: list[DatasetRecord]) -> None:
        """The run's data sets (``mlflow.log_input``'s record: name, digest, source, profile, context). MLflow
        keeps one record per data set and run, so a resumed run logging them again adds nothing."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        inputs = [DatasetInput(Dataset(d.name, d.digest, "local" if "://" not in d.source else
                                       d.source.split("://", 1)[0], json.dumps({"uri": d.source}),
                                       profile=json.dumps(d.profile)), [InputTag(MLFLOW_DATASET_CONTEXT, d.context)])
                  for d in datasets]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def inputs(self, run_id: str) -> list[DatasetRecord]:
        """The data sets logged for ``run_id``."""
        import json

        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
        out = []
        for i in self.client.get_run(run_id).inputs.dataset_inputs:
            d, tags = i.dataset, {t.key: t.value for t in i.tags}
            out.append(DatasetRecord(d.name, d.digest, json.loads(d.source).get("uri", d.source),
                                     json.loads(d.profile or "{}"), tags.get(MLFLOW_DATASET_CONTEXT, "")))
        return out

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of ``key``, by step (then time)."""
        metrics = sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return [(m.step, m.value) for m in metrics]

    def last_step(self, run_id: str, key: str) -> int:
        """Highest step logged for ``key`` (-1 if none)."""
        return max((step for step, _ in self.history(run_id, key)), default=-1)

    def logged_steps(self, run_id: str) -> dict[str, int]:
        """Highest step logged per metric key of a run (system metrics aside): what a resumed run must not log
        again. Per key, because a run killed mid-step can have logged ``train/loss`` for a step but not the
        ``val/loss`` that follows it; the resumed run recomputes that step and must still log the missing key."""
        keys = [k for k in self.get(run_id).metrics if not k.startswith("system/")]
        return {k: self.last_step(run_id, k) for k in keys}

    def reopen(self, run_id: str) -> None:
        """Mark a run found again RUNNING (a rerun continues it)."""
        self.client.update_run(run_id, status="RUNNING")

    def terminate(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    # -- registered models ---------------------------------------------------------------------
    def register_model(self, name: str, run_id: str, location: str, tags: dict[str, str] | None = None,
                       step: int = 0, metrics: dict[str, float] | None = None, loadable: bool = False) -> str:
        """The version of registered model ``name`` (created if missing) for the checkpoint at ``location``
        made by ``run_id``: a new one, or the one that already names this location (a rerun registers
        nothing twice). With it, an MLflow 3 LoggedModel of the run; the version names the checkpoint
        itself (tag ``mvar.checkpoint``), links the run (its metrics) and the LoggedModel, and carries the
        checkpoint's ``step`` and ``metrics`` as tags. ``loadable`` (a generator checkpoint): the LoggedModel
        holds the checkpoint as an MLflow pyfunc (`mvar.generator_pyfunc`: a copy of its weights and tokenizer,
        no optimizer state) and is the version's source, so ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")``
        samples images; otherwise the source is the checkpoint's location where the store takes a path (no copy
        of the weights)."""
        c = self.client
        found = c.search_model_versions(f"name = '{name}' and tags.`{CHECKPOINT_TAG}` = '{location}'")
        if found:
            return str(min(int(v.version) for v in found))
        try:
            c.create_registered_model(name, tags={"mvar.model": name})
        except Exception as err:  # only "exists already" is expected
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(err, "error_code", "")) + str(err):
                raise
        model_id, pyfunc_at = self._logged_model(name, run_id, location, step, metrics or {}, loadable)
        all_tags = {CHECKPOINT_TAG: location, "mvar.step": str(step), "mvar.logged_model": model_id,
                    **{k: f"{v:.6g}" for k, v in (metrics or {}).items()}, **(tags or {})}
        # a tracking server takes no local path as a version's source: it gets the LoggedModel, which it
        # resolves itself; a store opened in this process (SQLite) takes the checkpoint's location, or where the
        # LoggedModel's pyfunc lies (MLflow's SQL registry would resolve models:/<model_id> in the store of the
        # process-wide tracking URI, not this one)
        remote = self.uri.startswith(("http://", "https://"))
        source = f"models:/{model_id}" if remote else pyfunc_at or location
        return str(c.create_model_version(name, source, run_id=run_id, tags=all_tags, model_id=model_id).version)

    def _logged_model(self, name: str, run_id: str, location: str, step: int, metrics: dict[str, float],
                      loadable: bool = False) -> tuple[str, str]:
        """(id, where its pyfunc lies, '' if none) of an MLflow 3 LoggedModel of ``run_id`` (the experiment's
        Models tab), the checkpoint's metrics as its tags: logged as metrics with the model's id they would enter the run's
        history a second time. A pyfunc that cannot be saved costs a warning: the version still names the
        checkpoint (``mvar sample --model`` and ``mvar eval`` load it from there)."""
        from mlflow.entities import LoggedModelStatus
        c = self.client
        model = c.create_logged_model(self.get(run_id).experiment_id, name=name, source_run_id=run_id,
                                      tags={CHECKPOINT_TAG: location, **{k: f"{v:.6g}" for k, v in metrics.items()}},
                                      params={"step": str(step)}, model_type="mvar-pyfunc" if loadable
                                      else "mvar-checkpoint")
        saved = ""
        if loadable:
            try:
                self._log_pyfunc(model.model_id, location)
                saved = model.artifact_location
            except Exception as err:  # noqa: BLE001 - the version is still registered, by its checkpoint
                log.warning("model registry: '%s' of %s is registered without its pyfunc: %s", name, location, err)
        c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model.model_id, saved

    def _log_pyfunc(self, model_id: str, location: str) -> None:
        """The checkpoint at ``location`` saved as a pyfunc model and uploaded as LoggedModel ``model_id``'s
        artifacts (MLmodel at their root: what ``mlflow.pyfunc.load_model`` reads)."""
        import tempfile

        from mvar import generator_pyfunc
        with tempfile.TemporaryDirectory(prefix="mvar-model-") as tmp:
            out = generator_pyfunc.save(location, Path(tmp) / "model")
            self.client.log_model_artifacts(model_id, str(out))

    def model_version(self, model_uri: str) -> dict[str, str] | None:
        """The tags (and ``version``, ``run_id``, ``source``) of the version ``models:/NAME@ALIAS`` names; None if none."""
        name, alias, version = _parse_model_uri(model_uri)
        try:
            if version == "latest":  # MLflow's spelling of the newest version
                newest = self.client.search_model_versions(f"name = '{name}'", max_results=1,
                                                           order_by=["version_number DESC"])
                if not newest:
                    return None
                version = newest[0].version
            mv = (self.client.get_model_version_by_alias(name, alias) if alias
                  else self.client.get_model_version(name, version))
        except Exception:  # noqa: BLE001 - unknown model or alias: none
            return None
        return {**mv.tags, "version": str(mv.version), "run_id": mv.run_id or "", "source": mv.source}

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """``models:/NAME@ALIAS`` names ``version`` from now on (an alias moves, a version stays)."""
        self.client.set_registered_model_alias(name, alias, str(version))

    def resolve_model(self, model_uri: str) -> str:
        """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/NAME/latest`` -> the checkpoint location of
        that version."""
        _parse_model_uri(model_uri)  # the form first: its own error
        mv = self.model_version(model_uri)
        if mv is None:
            known = ", ".join(sorted(m.name for m in self.client.search_registered_models(max_results=50)))
            raise UserError(f"'{model_uri}' is not a registered model version in {self.uri} "
                            f"(registered models: {known or 'none'})")
        return mv.get(CHECKPOINT_TAG) or mv["source"]


def _parse_model_uri(model_uri: str) -> tuple[str, str, str]:
    """(name, alias, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (VERSION may be ``latest``)."""
    rest = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    name, at, alias = rest.partition("@")
    if not at:
        name, _, version = rest.partition("/")
        if name and (version.isdigit() or version == "latest"):
            return name, "", version
    elif name and alias and "/" not in name:
        return name, alias, ""
    raise UserError(f"model '{model_uri}' is not of the form models:/NAME@ALIAS or models:/NAME/VERSION")


def start_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a run of ``cfg``'s store and experiment (named ``cfg.run_name`` if set) and return its id."""
    return Store(cfg.uri).create_run(cfg.experiment, cfg.run_name or run_name, tags, parent_run_id)


def experiment_id(name: str, uri: str = "") -> str:
    return Store(uri).experiment_id(name)


def last_logged_step(run_id: str, key: str, uri: str = "") -> int:
    return Store(uri).last_step(run_id, key)


def logged_steps(run_id: str, uri: str = "") -> dict[str, int]:
    return Store(uri).logged_steps(run_id)


def logged_image_steps(client, run_id: str, key: str) -> set[int]:
    """The steps at which run ``run_id`` has an image of ``key`` (``log_image``'s files are named
    ``images/KEY+step+STEP+timestamp+...``, a ``/`` of the key as ``~``)."""
    prefix = key.replace("/", "~") + "+step+"
    steps = set()
    for item in client.list_artifacts(run_id, "images"):
        name = item.path.rsplit("/", 1)[-1]
        number = name[len(prefix):].split("+", 1)[0] if name.startswith(prefix) else ""
        if number.isdigit():
            steps.add(int(number))
    return steps


def system_metrics_node(node_rank: int) -> str:
    """The node id of a node's system metrics: MLflow names them ``system/<node id>/<metric>``."""
    return f"node_{node_rank}"


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """MLflow's fluent API (``start_run``, ``end_run``) on ``uri``; the process's own setting (MLflow keeps it
    in MLFLOW_TRACKING_URI) is put back after, so a run in the calling process changes nothing of it."""
    import mlflow
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again


class SystemMetrics:
    """MLflow's sampler of this machine (CPU, memory, disk, network; GPUs with nvidia-ml-py) into run
    ``run_id``, through MLflow's public API: the run resumed as this thread's active run with
    ``log_system_metrics=True``, the node id and interval set just for that start (MLflow reads them when it
    makes the sampler; they are process-wide environment variables, so they are unset again at once). Its
    steps go on from the run's last system step, so a restarted run or a second node adds no duplicate step.
    Stopping it ends the active run: MLflow's only public way to stop the sampler, which also marks the run
    with a status; the status the run has at that moment is given again (the driver sets the final one)."""

    def __init__(self, run_id: str, uri: str, interval_s: float, node_id: str):
        self.run_id, self.uri, self.interval_s, self.node_id = run_id, uri, interval_s, node_id
        self._active = False

    def start(self) -> bool:
        import mlflow
        try:
            with _fluent_uri(self.uri):
                mlflow.set_system_metrics_node_id(self.node_id)
                mlflow.set_system_metrics_sampling_interval(self.interval_s)
                try:
                    mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
                finally:
                    mlflow.set_system_metrics_node_id(None)
                    mlflow.set_system_metrics_sampling_interval(None)
            self._active = True
        except Exception as err:  # noqa: BLE001 - system metrics are a convenience, never fatal
            log.warning("system metrics of %s not started: %s", self.node_id, err)
        return self._active

    def stop(self, status: str = "") -> None:
        """Stop sampling (the last samples sent); the run keeps its status, or gets ``status``."""
        if not self._active:
            return
        import mlflow
        self._active = False
        try:
            with _fluent_uri(self.uri):
                mlflow.end_run(status or mlflow.get_run(self.run_id).info.status)
        except Exception as err:  # noqa: BLE001
            log.warning("system metrics of %s did not stop cleanly: %s", self.node_id, err)


class NullTracker:
    """What ranks other than 0 (and dry runs) log to."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_image(self, image, key: str, step: int) -> None: ...
    def log_table(self, data: dict[str, list], artifact_file: str) -> None: ...
    def flush(self, timeout_s: float | None = None) -> bool: return True
    def close(self, status: str = "FINISHED") -> None: ...


class NodeTracker(NullTracker):
    """What the first rank of each other node logs: that node's system metrics (``tracking.system_metrics``),
    nothing else. Its ``close`` stops the sampler and leaves the run's status to rank 0 and the driver."""

    def __init__(self, run_id: str, cfg: TrackingConfig, node_id: str):
        self.run_id = run_id
        self._monitor = SystemMetrics(run_id, resolve_uri(cfg.uri), cfg.system_metrics_interval_s, node_id)
        if cfg.system_metrics:
            self._monitor.start()

    def close(self, status: str = "FINISHED") -> None:
        self._monitor.stop()


class MlflowTracker(NullTracker):
    """Logs to an existing MLflow run from a background thread that retries failures."""

    def __init__(self, run_id: str, cfg: TrackingConfig, skip_logged: bool = False):
        from mlflow import MlflowClient
        self.run_id, self.cfg = run_id, cfg
        self.uri = resolve_uri(cfg.uri)
        self._client = MlflowClient(tracking_uri=self.uri)
        # a resumed run: per key, the steps already logged are not logged again (images: looked up when first logged)
        self._logged = Store(self.uri).logged_steps(run_id) if skip_logged else {}
        self._image_steps: dict[str, set[int]] | None = {} if skip_logged else None
        self._queue: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="mvar-tracking", daemon=True)
        self._thread.start()
        self._monitor = None
        self.failures = 0

    # -- the interface -------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """MLflow's client splits the batch (100 params a request) and its store truncates long values."""
        from mlflow.entities import Param
        items = [Param(k, str(v)) for k, v in flatten(params).items()]
        self._submit(lambda: self._client.log_batch(self.run_id, params=items))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._submit(lambda: self._client.log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self._logged.get(k, -1)]
        if not items:
            return
        self._submit(lambda: self._client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        self._submit(lambda: self._client.log_artifact(self.run_id, str(path), artifact_dir))

    def log_text(self, text: str, name: str) -> None:
        self._submit(lambda: self._client.log_text(self.run_id, text, name))

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """Columns of equal length as an MLflow table artifact (``artifact_file``: a .json path)."""
        self._submit(lambda: self._client.log_table(self.run_id, data, artifact_file))

    def log_image(self, image, key: str, step: int) -> None:
        """An image (uint8 (H, W, 3) array) under ``key`` at ``step``: MLflow's image view steps through them.
        A resumed run (``skip_logged``) logs none for a step that has one of ``key`` already."""
        def send() -> None:
            if self._image_steps is not None:
                if key not in self._image_steps:
                    self._image_steps[key] = logged_image_steps(self._client, self.run_id, key)
                if step in self._image_steps[key]:
                    return
                self._image_steps[key].add(step)
            self._client.log_image(self.run_id, image, key=key, step=step)
        self._submit(send)

    def start_system_metrics(self, node_id: str = "node_0") -> None:
        """MLflow's sampler of this node into this run (``tracking.system_metrics``), its metrics named
        ``system/<node_id>/...``, every ``tracking.system_metrics_interval_s``."""
        if self.cfg.system_metrics:
            self._monitor = SystemMetrics(self.run_id, self.uri, self.cfg.system_metrics_interval_s, node_id)
            self._monitor.start()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is sent (at most ``timeout_s``, default flush_timeout_s)."""
        sent = threading.Event()
        self._submit(sent.set)
        if sent.wait(self.cfg.flush_timeout_s if timeout_s is None else timeout_s):
            return True
        log.warning("tracking: %d operations still queued; going on without waiting", self._queue.qsize())
        return False

    def close(self, status: str = "FINISHED") -> None:
        """Flush the queue (bounded wait), stop the sampler, and mark the run ``status`` (or leave it)."""
        if self._monitor is not None:
            self._monitor.stop(status)
        if status:
            self._submit(lambda: self._client.set_terminated(self.run_id, status))
        self._queue.put(None)
        self._thread.join(self.cfg.flush_timeout_s)
        if self._thread.is_alive():
            log.warning("tracking: %d operations still queued after %.0f s; giving up on them",
                        self._queue.qsize(), self.cfg.flush_timeout_s)

    # -- background sending -------------------------------------------------
    def _submit(self, op: Callable[[], Any]) -> None:
        self._queue.put(op)

    def _drain(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            self._send(op)

    def _send(self, op: Callable[[], Any]) -> None:
        deadline, delay = time.monotonic() + self.cfg.retry_s, 1.0
        while True:
            try:
                op()
                return
            except Exception as err:  # noqa: BLE001 - the server may be down; training goes on
                self.failures += 1
                if time.monotonic() >= deadline:
                    log.error("tracking: dropped one operation after %.0f s of failures: %s", self.cfg.retry_s, err)
                    return
                log.warning("tracking: MLflow call failed (%s: %s); retrying in %.0f s",
                            type(err).__name__, str(err)[:200], delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

