"""A training run's directory in Ray Train storage (``run.storage_path/run.name``): the checkpoints
Ray Train registered, what is left of writes that never finished, and where a run resumes.

Ray Train V2 records, in ``checkpoint_manager_snapshot.json`` there, the checkpoints it registered
(reported and completely persisted; oldest first) and the latest one, which a restarted worker
group or a rerun of the same command resumes from. Two kinds of leftovers are never resumed from:
``.step_N.partial-XXXX`` (a checkpoint whose writer was killed before its rename:
`mvar.checkpoint.staged_dir`) and a ``step_N`` that Ray never registered (an upload cut short, a
writer killed between its rename and its report). ``prune`` removes both; the driver runs it before
a run starts and when it ends, and rank 0 removes partial directories when a worker group starts,
so only the ``run.keep_checkpoints`` that Ray keeps stay.

``resume_point`` checks the checkpoint Ray would resume from before any worker starts (its train
state's pickle and every file's structure: `mvar.checkpoint.check_train_checkpoint`). A damaged
one is passed over for the newest registered checkpoint that is complete: a restart redoes the steps
between the two (MLflow keeps their first values) instead of every worker failing on the same file
until `run.max_failures` is spent. Ray's record is only read, never edited: the damaged checkpoint
stays registered until Ray's retention drops it, and a rewritten step gets another directory name.

These checks read the files, so they run where ``run.storage_path`` is a local (or shared) path;
for an object store (s3://...) Ray Train's own handling applies.

A run without Ray (`mvar.training.local`) keeps the same record with ``record_checkpoint``, as Ray
Train does when a worker reports a checkpoint, so that Ray resumes its checkpoints and the other
way round. The record's format is Ray's (`mvar.ray_private`: checked there against Ray's own model).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from mvar.checkpoint import check_train_checkpoint, is_partial
from mvar.errors import UserError
from mvar.files import read_json_mapping, write_text_atomic

log = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
PREFIX = "step_"


def checkpoint_name(step: int, taken: frozenset[str] | set[str] = frozenset()) -> str:
    """``step_NNNNNNNN``, or ``step_NNNNNNNN-K`` when Ray still holds a (damaged) one of that name."""
    name = base = f"{PREFIX}{step:08d}"
    k = 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    return name


@dataclass
class Registered:
    names: list[str] = field(default_factory=list)   # oldest first
    latest: str | None = None
    metrics: dict[str, dict] = field(default_factory=dict)  # name -> the metrics it was reported with


def registered(run_dir: Path) -> Registered:
    """The checkpoints Ray Train registered for the run in ``run_dir`` (none before its first)."""
    path = Path(run_dir) / SNAPSHOT
    if not path.is_file():
        return Registered()
    data = read_json_mapping(path, "Ray Train checkpoint record")
    try:
        names = [str(r["checkpoint_dir_name"]) for r in data["checkpoint_results"]]
        latest = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        metrics = {str(r["checkpoint_dir_name"]): dict(r.get("metrics") or {}) for r in data["checkpoint_results"]}
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise UserError(f"Ray Train checkpoint record '{path}' does not list checkpoints as Ray 2.60 does "
                        f"(missing {err}); move '{run_dir}' away to start the run over") from None
    return Registered(names, latest, metrics)


def prune(run_dir: Path, partial_only: bool = False) -> list[str]:
    """Remove the partial directories and the ``step_*`` Ray did not register; returns their names."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    keep = set() if partial_only else set(registered(run_dir).names)
    gone = []
    for child in sorted(run_dir.iterdir()):
        unregistered = not partial_only and child.name.startswith(PREFIX) and child.name not in keep
        if child.is_dir() and (is_partial(child.name) or unregistered):
            shutil.rmtree(child, ignore_errors=True)
            gone.append(child.name)
    if gone:
        log.warning("removed %d checkpoint(s) that no run resumes from in %s: %s", len(gone), run_dir,
                    ", ".join(gone))
    return gone


@dataclass
class ResumePoint:
    start: str | None = None          # the checkpoint the run resumes from (None: from scratch)
    step: int = 0
    damaged: dict[str, str] = field(default_factory=dict)   # registered, passed over: name -> problem


def resume_point(run_dir: Path) -> ResumePoint:
    """Where a run in ``run_dir`` resumes: Ray's latest checkpoint if it is complete, else the newest
    complete one it registered. A UserError naming the file when none is, or one is gone."""
    run_dir = Path(run_dir)
    reg = registered(run_dir)
    gone = [n for n in reg.names if not (run_dir / n).is_dir()]
    if gone:
        raise UserError(f"Ray Train's checkpoint record '{run_dir / SNAPSHOT}' lists {', '.join(gone)}, which "
                        f"no longer exist(s) in '{run_dir}': Ray cannot resume this run; put them back, "
                        f"or move '{run_dir}' away to start the run over")
    if reg.latest is None:
        return ResumePoint()
    point = ResumePoint()
    for name in [reg.latest, *(n for n in reversed(reg.names) if n != reg.latest)]:
        try:
            point.step, point.start = check_train_checkpoint(run_dir / name), name
            return point
        except UserError as err:
            point.damaged[name] = str(err)
    first = next(iter(point.damaged.values()))
    raise UserError(f"no checkpoint of the run in '{run_dir}' can be resumed from ({first}); move '{run_dir}' "
                    "away, or choose another run.name, to start the run over")


def _ray_version() -> str:
    """The installed Ray's version, without importing Ray: Ray refuses a record of another version."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        from mvar.ray_private import CHECKED_ON
        return CHECKED_ON


def new_record() -> dict:
    """An empty checkpoint record, as Ray Train V2 writes it (`_CheckpointManagerState`)."""
    return {"ray_version": _ray_version(), "checkpoint_results": [], "checkpoint_report_indices": [],
            "latest_checkpoint_result": None, "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": 0, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}


def _read_record(run_dir: Path) -> dict:
    path = Path(run_dir) / SNAPSHOT
    data = read_json_mapping(path, "Ray Train checkpoint record") if path.is_file() else new_record()
    registered(run_dir)  # a record of another shape: the UserError that says so
    return data


def _retain(data: dict, keep: int) -> list[str]:
    """Ray Train's retention on the record: the oldest beyond ``keep`` leave it, except the latest and those
    whose validation is pending. Returns the names that left."""
    pending = {r["checkpoint_dir_name"] for r in data.get("pending_training_results") or ()}
    latest = (data.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    pairs = list(zip(data["checkpoint_results"], data["checkpoint_report_indices"]))
    spare = {r["checkpoint_dir_name"] for r, _ in pairs[:-keep]} - pending - {latest}
    kept = [(r, i) for r, i in pairs if r["checkpoint_dir_name"] not in spare]
    data.update(checkpoint_results=[r for r, _ in kept], checkpoint_report_indices=[i for _, i in kept])
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        data[key] = [n for n in data.get(key) or () if n not in spare]
    return sorted(spare)


def _write_record(run_dir: Path, data: dict, dropped: list[str]) -> None:
    """The record (atomically), then the checkpoints that left it deleted."""
    write_text_atomic(Path(run_dir) / SNAPSHOT, json.dumps(data))
    for old in dropped:
        shutil.rmtree(Path(run_dir) / old, ignore_errors=True)


def record_checkpoint(run_dir: Path, name: str, metrics: dict, keep: int, validate: bool = False) -> list[str]:
    """Register the complete checkpoint ``run_dir/name`` (reported with ``metrics``) as the latest in the
    run's record, as Ray Train does at a report: the oldest beyond ``keep`` leave the record, which is
    written (atomically) before they are deleted. ``validate``: its evaluation is pending (as a report with
    ``validation=True``), until ``record_validation``. Returns the names deleted."""
    run_dir = Path(run_dir)
    data = _read_record(run_dir)
    result = {"version": 0, "checkpoint_dir_name": name, "metrics": metrics}
    pairs = [(r, i) for r, i in zip(data["checkpoint_results"], data["checkpoint_report_indices"])
             if r["checkpoint_dir_name"] != name]
    pairs.append((result, int(data["current_report_index"])))
    data.update(checkpoint_results=[r for r, _ in pairs], checkpoint_report_indices=[i for _, i in pairs],
                latest_checkpoint_result=result, current_report_index=int(data["current_report_index"]) + 1)
    if validate:
        data["pending_training_results"] = [*(data.get("pending_training_results") or ()), dict(result)]
        data["pending_validation_specs"] = [*(data.get("pending_validation_specs") or ()), True]
    dropped = _retain(data, keep)
    _write_record(run_dir, data, dropped)
    return dropped


def pending_validations(run_dir: Path) -> list[str]:
    """The checkpoints whose evaluation was asked for and has not ended (the run stopped first), oldest first."""
    path = Path(run_dir) / SNAPSHOT
    if not path.is_file():
        return []
    return [str(r["checkpoint_dir_name"]) for r in _read_record(run_dir).get("pending_training_results") or ()]


def record_validation(run_dir: Path, name: str, metrics: dict | None, keep: int) -> list[str]:
    """The end of checkpoint ``name``'s pending evaluation, as Ray Train records it: ``metrics`` merged into the
    checkpoint's (validated), or None (failed); then the retention. Returns the names deleted."""
    run_dir = Path(run_dir)
    data = _read_record(run_dir)
    pending = list(zip(data.get("pending_training_results") or (), data.get("pending_validation_specs") or ()))
    kept = [(r, v) for r, v in pending if r["checkpoint_dir_name"] != name]
    data.update(pending_training_results=[r for r, _ in kept], pending_validation_specs=[v for _, v in kept])
    for result in (*data["checkpoint_results"], data.get("latest_checkpoint_result") or {}):
        if metrics is not None and result.get("checkpoint_dir_name") == name:
            result["metrics"] = {**result["metrics"], **metrics}
    key = "validated_checkpoint_dir_names" if metrics is not None else "failed_validation_checkpoint_dir_names"
    data[key] = [*(n for n in data.get(key) or () if n != name), name]
    dropped = _retain(data, keep)
    _write_record(run_dir, data, dropped)
    return dropped
