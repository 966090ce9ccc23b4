"""When the long commands draw progress bars (mvar.progress): on a terminal only, unless told."""
from __future__ import annotations

import os
import pty

from mvar import progress


def test_bars_are_drawn_on_a_terminal_only_unless_forced_or_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv(progress.ENV, raising=False)
    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as tty, open(tmp_path / "log", "w") as log:
            monkeypatch.setattr("sys.stderr", tty)
            assert progress.enabled() and not progress.enabled(flag=False)  # --no-progress
            monkeypatch.setenv(progress.ENV, "0")
            assert not progress.enabled()
            monkeypatch.setattr("sys.stderr", log)  # a log file, a pipe, `ray job logs`
            monkeypatch.delenv(progress.ENV)
            assert not progress.enabled()
            assert progress.bar(10, "x").disable
            monkeypatch.setenv(progress.ENV, "1")
            assert progress.enabled() and not progress.bar(10, "x").disable
    finally:
        os.close(leader)
        os.close(follower)
