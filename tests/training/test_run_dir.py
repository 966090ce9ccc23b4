"""The run directory checks that the driver makes before Ray starts (mvar.training.run_dir), on real
checkpoints written by the trainer core and a checkpoint record written by Ray Train's own model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from mvar.errors import UserError
from mvar.files import save_torch
from mvar.training import run_dir as rundir
from mvar.training.config import OptimConfig, RunSettings
from mvar.training.trainer import Trainer, TrainTask


class LinearTask(TrainTask):
    def __init__(self):
        self.module = torch.nn.Linear(4, 2)

    def save_weights(self, out: Path, meta: dict) -> Path:
        out.mkdir()
        save_torch(self.module.state_dict(), out / "model.pt")
        (out / "checkpoint.yaml").write_text(yaml.safe_dump(meta))
        return out


@dataclass
class _Data:
    batch_size: int = 2


@dataclass
class _Cfg:
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSettings = field(default_factory=lambda: RunSettings(steps=30))
    data: _Data = field(default_factory=_Data)


def ray_record(run: Path, names: list[str]) -> None:
    """Ray Train V2's checkpoint_manager_snapshot.json for ``names`` (oldest first), by Ray's own model."""
    from mvar.ray_private import CheckpointManagerState as _CheckpointManagerState
    from mvar.ray_private import TrainingResultState as _TrainingResultState
    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={}) for n in names]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1] if results else None, pending_training_results=[],
        pending_validation_specs=[], current_report_index=len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (run / rundir.SNAPSHOT).write_text(state.json())


@pytest.fixture
def run(tmp_path) -> Path:
    """A run directory with checkpoints of steps 10 and 20 that Ray registered."""
    trainer = Trainer(LinearTask(), _Cfg(), torch.device("cpu"))
    for step in (10, 20):
        trainer.save(tmp_path / rundir.checkpoint_name(step), step)
    ray_record(tmp_path, ["step_00000010", "step_00000020"])
    return tmp_path


def test_prune_removes_partial_and_unregistered_checkpoints_only(run):
    (run / "step_00000030").mkdir()                           # copied half, never registered
    (run / ".step_00000030.partial-1234abcd").mkdir()          # its writer was killed
    (run / "notes").mkdir()                                    # not ours to judge
    assert rundir.prune(run, partial_only=True) == [".step_00000030.partial-1234abcd"]
    assert rundir.prune(run) == ["step_00000030"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["notes", "step_00000010", "step_00000020"]


def test_the_resume_point_is_the_latest_complete_checkpoint(run):
    point = rundir.resume_point(run)
    assert (point.start, point.step, point.damaged) == ("step_00000020", 20, {})
    state = run / "step_00000020" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    point = rundir.resume_point(run)
    assert (point.start, point.step) == ("step_00000010", 10)
    assert list(point.damaged) == ["step_00000020"] and str(state) in point.damaged["step_00000020"]
    (run / "step_00000010" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"no checkpoint of the run in .* can be resumed from \(cannot read train"):
        rundir.resume_point(run)


def test_a_registered_checkpoint_that_is_gone_is_one_line_naming_it(run):
    import shutil
    shutil.rmtree(run / "step_00000010")
    with pytest.raises(UserError, match="lists step_00000010, which no longer exist"):
        rundir.resume_point(run)
    (run / rundir.SNAPSHOT).write_text("{not json")
    with pytest.raises(UserError, match="Ray Train checkpoint record .* is not valid JSON"):
        rundir.resume_point(run)


def test_a_rewritten_step_gets_a_name_ray_does_not_hold():
    assert rundir.checkpoint_name(40) == "step_00000040"
    assert rundir.checkpoint_name(40, {"step_00000040"}) == "step_00000040-2"
    assert rundir.checkpoint_name(40, {"step_00000040", "step_00000040-2"}) == "step_00000040-3"
    assert rundir.resume_point(Path("/nonexistent/run")).start is None
