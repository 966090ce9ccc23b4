"""The fault-injection hook (mvar.faults) and what a checkpoint write does when it fires: a kill leaves
only a partial directory, a full disk is one DiskFull naming the checkpoint with nothing left of it."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from mvar import faults
from mvar.checkpoint import is_partial, staged_dir
from mvar.errors import DiskFull, UserError


def test_fault_names_and_steps_are_parsed_and_unknown_ones_refused():
    assert faults.parse("abort-after-model-file@20") == ("abort-after-model-file", 20)
    assert faults.parse("enospc-shard") == ("enospc-shard", None)
    with pytest.raises(ValueError, match="unknown fault 'abort-later'.*known: abort-after-model-file"):
        faults.parse("abort-later@3")
    with pytest.raises(ValueError, match="'@x' must be a step or shard index"):
        faults.parse("enospc-checkpoint@x")


def test_a_fault_fires_only_at_its_point_and_step_and_once_with_a_once_file(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.FAULT_ENV, "enospc-checkpoint@20")
    faults.point("shard-data-written", 20)  # another point
    faults.point("checkpoint-model-written", 10)  # another step
    with pytest.raises(OSError) as err:
        faults.point("checkpoint-model-written", 20)
    assert err.value.errno == errno.ENOSPC and "injected by MVAR_FAULT" in str(err.value)
    monkeypatch.setenv(faults.ONCE_ENV, str(tmp_path / "fired"))
    with pytest.raises(OSError):
        faults.point("checkpoint-model-written", 20)
    faults.point("checkpoint-model-written", 20)  # fired once already: nothing
    assert faults.forwarded_env() == {faults.FAULT_ENV: "enospc-checkpoint@20", faults.ONCE_ENV: str(tmp_path / "fired")}


def test_an_injected_enospc_inside_a_staged_dir_is_a_disk_full_naming_it_with_nothing_left(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.FAULT_ENV, "enospc-checkpoint")
    out = tmp_path / "step_00000020"
    with pytest.raises(DiskFull, match=f"no space left on the device of '{tmp_path}' while writing 'step_00000020'"):
        with staged_dir(out) as tmp:
            tmp.mkdir()
            (tmp / "model.pt").write_bytes(b"weights")
            faults.point("checkpoint-model-written", 20)
    assert isinstance(DiskFull("x"), UserError)
    assert list(tmp_path.iterdir()) == []


def test_a_kill_after_the_model_file_leaves_only_a_partial_directory(tmp_path):
    """The abort is a real SIGKILL of the writing process: no cleanup runs, the rename never happens."""
    code = ("import sys; from pathlib import Path; from mvar import faults; from mvar.checkpoint import staged_dir\n"
            "with staged_dir(Path(sys.argv[1])) as tmp:\n"
            "    tmp.mkdir(); (tmp / 'model.pt').write_bytes(b'weights')\n"
            "    faults.point('checkpoint-model-written', 20)\n")
    env = {**os.environ, faults.FAULT_ENV: "abort-after-model-file@20"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "step_00000020")], env=env, check=False)
    assert done.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and is_partial(left[0]) and left[0].startswith(".step_00000020.partial-")
    assert (tmp_path / left[0] / "model.pt").is_file() and not (tmp_path / "step_00000020").exists()
