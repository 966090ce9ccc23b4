"""Ray behind one seam (mvar/ray_private.py): every private Ray API the project uses is there, still where
it was when checked, and nowhere else; the checkpoint record that a local run writes is the one Ray Train
reads."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from mvar import ray_private
from mvar.training import run_dir as rundir

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_USE = re.compile(r"ray\.train\._internal|ray\.train\.v2\._internal|ray\._private|ray\._common"
                         r"|from ray[\w.]* import [^\n]*\b_[a-zA-Z]")


def test_ray_is_the_version_the_seam_was_checked_on():
    import ray
    assert ray.__version__ == ray_private.CHECKED_ON, (
        f"Ray {ray.__version__}: re-check every entry of mvar/ray_private.py (and Ray Train's checkpoint "
        f"record, mvar/training/run_dir.py) against it, then set CHECKED_ON")


@pytest.mark.parametrize("name", sorted(ray_private.PRIVATE))
def test_each_private_ray_name_is_where_it_was(name):
    module, attr = ray_private.PRIVATE[name]
    found = importlib.import_module(module)
    if attr is not None:
        assert hasattr(found, attr), f"Ray {ray_private.CHECKED_ON}'s {module}.{attr} has moved"
    for used in ray_private.ATTRIBUTES.get(name, ()):
        assert hasattr(found, used), f"{module}.{used} has moved"
    assert getattr(ray_private, name) is (found if attr is None else getattr(found, attr))


def test_the_seam_wraps_what_the_project_does_with_them():
    import logging
    assert isinstance(ray_private.report_logger(), logging.Logger)
    assert ray_private.report_logger().name == ray_private.train_context.__file__
    with pytest.raises(AttributeError):
        ray_private.NotThere  # noqa: B018


def test_no_other_source_file_uses_a_private_ray_api():
    seam = ROOT / "mvar" / "ray_private.py"
    files = [p for d in ("mvar", "sweeps", "workflows", "tools", "tests") for p in (ROOT / d).rglob("*.py")]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files if p not in (seam, Path(__file__))
                 for i, line in enumerate(p.read_text().splitlines(), 1) if PRIVATE_USE.search(line)]
    assert not offenders, f"private Ray APIs outside mvar/ray_private.py: {offenders}"
    assert PRIVATE_USE.search("from ray.train.torch.config import _TorchBackend")  # the pattern finds them


def _checkpoints(run: Path, steps) -> None:
    for step in steps:
        (run / rundir.checkpoint_name(step)).mkdir(parents=True)


def test_the_record_a_local_run_keeps_is_ray_train_s(tmp_path):
    """The record of mvar.training.run_dir.record_checkpoint, read by Ray Train's own checkpoint manager (what
    a rerun on Ray Train resumes from), and a record Ray's model wrote, continued by record_checkpoint."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    run = tmp_path / "run"
    _checkpoints(run, (10, 20, 30))
    for step in (10, 20, 30):
        rundir.record_checkpoint(run, rundir.checkpoint_name(step), {"step": step, "train/loss": 1.0 / step}, keep=2)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["step_00000020", "step_00000030"]
    data = json.loads((run / rundir.SNAPSHOT).read_text())
    state = ray_private.CheckpointManagerState.parse_obj(data)
    assert json.loads(state.json()) == data  # every field Ray's, none missing, none extra
    assert (state.current_report_index, state.checkpoint_report_indices) == (3, [1, 2])

    manager = CheckpointManager(CheckpointConfig(num_to_keep=2),
                                StorageContext(storage_path=str(tmp_path), experiment_dir_name="run", read_only=True))
    assert Path(manager.latest_checkpoint_result.checkpoint.path) == run / "step_00000030"
    assert manager.latest_checkpoint_result.metrics == {"step": 30, "train/loss": 1.0 / 30}

    # a record of Ray's own model (a run on Ray Train), continued by a local run
    ray_run = tmp_path / "ray-run"
    _checkpoints(ray_run, (5, 10))
    results = [ray_private.TrainingResultState(checkpoint_dir_name=rundir.checkpoint_name(s), metrics={"step": s})
               for s in (5, 10)]
    state = ray_private.CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=[3, 7], latest_checkpoint_result=results[-1],
        pending_training_results=[], pending_validation_specs=[], current_report_index=8,
        validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[])
    (ray_run / rundir.SNAPSHOT).write_text(state.json())
    _checkpoints(ray_run, (15,))
    assert rundir.record_checkpoint(ray_run, "step_00000015", {"step": 15}, keep=2) == ["step_00000005"]
    state = ray_private.CheckpointManagerState.parse_raw((ray_run / rundir.SNAPSHOT).read_text())
    assert [r.checkpoint_dir_name for r in state.checkpoint_results] == ["step_00000010", "step_00000015"]
    assert (state.checkpoint_report_indices, state.current_report_index) == ([7, 8], 9)
    assert state.latest_checkpoint_result.checkpoint_dir_name == "step_00000015"


def test_a_pending_checkpoint_evaluation_in_a_local_record_is_ray_train_s_pending_validation(tmp_path):
    """A local run's record of a checkpoint whose evaluation was asked for (record_checkpoint(validate=True))
    is, for Ray Train's checkpoint manager, a validation to queue again (what a rerun on Ray Train does with
    it); once recorded (record_validation) it is validated, with the evaluation's metrics merged in; and
    retention never drops a checkpoint whose evaluation is pending."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2.api.reported_checkpoint import ReportedCheckpointStatus

    run = tmp_path / "run"
    _checkpoints(run, (2, 4, 6))
    for step in (2, 4, 6):
        rundir.record_checkpoint(run, rundir.checkpoint_name(step), {"step": step}, keep=1, validate=step > 2)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]
    assert rundir.pending_validations(run) == ["step_00000004", "step_00000006"]
    data = json.loads((run / rundir.SNAPSHOT).read_text())
    assert json.loads(ray_private.CheckpointManagerState.parse_obj(data).json()) == data

    def manager():
        return CheckpointManager(CheckpointConfig(num_to_keep=1), StorageContext(
            storage_path=str(tmp_path), experiment_dir_name="run", read_only=True))
    pending = manager().get_pending_training_results()
    assert sorted(Path(c.path).name for c in pending) == ["step_00000004", "step_00000006"]
    assert all(spec is True for _, spec in pending.values())  # Ray's ValidationManager queues these again

    assert rundir.record_validation(run, "step_00000004", {"eval/fid": 12.5}, keep=1) == ["step_00000004"]
    assert rundir.record_validation(run, "step_00000006", {"eval/fid": 11.0}, keep=1) == []
    assert rundir.pending_validations(run) == []
    m = manager()
    assert not m.get_pending_training_results()
    latest = m.latest_checkpoint_result
    assert Path(latest.checkpoint.path).name == "step_00000006" and latest.metrics == {"step": 6, "eval/fid": 11.0}
    assert m._get_checkpoint_status(latest.checkpoint) == ReportedCheckpointStatus.VALIDATED
