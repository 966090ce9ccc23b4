"""`python -m sweeps.train_child PARENT_PID [workflows.train arguments]`: a trial's training process.

It is `python -m workflows.train` that dies with the sweep that started it: a sweep killed
without its process group must not leave a training driver behind, which would go on
training the run that the sweep's retry of the trial resumes.
"""
from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent goes (elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def main(argv: list[str]) -> int:
    die_with_parent(int(argv[0]))
    from workflows.train import main as train_main
    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
