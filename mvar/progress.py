"""Progress bars of the long commands (tqdm on stderr), drawn only where a person watches.

A bar is off when stderr is not a terminal (a log file, a pipe, `ray job logs`, CI), with the
command's ``--no-progress``, or with ``MVAR_PROGRESS=0``; ``MVAR_PROGRESS=1`` draws it on any
stream (tests, or a terminal multiplexer that hides the tty). Inside Ray tasks the driver decides
(`enabled()` there) and the task draws with ``ray.experimental.tqdm_ray`` (mvar.evaluation.sampler),
whose state the driver renders.
"""
from __future__ import annotations

import os
import sys

ENV = "MVAR_PROGRESS"


def enabled(flag: bool = True) -> bool:
    """Whether this process should draw bars: ``flag`` (not --no-progress), then MVAR_PROGRESS, then a tty."""
    forced = os.environ.get(ENV, "").strip().lower()
    if not flag or forced in ("0", "false", "no"):
        return False
    return forced in ("1", "true", "yes") or sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", unit: str = "img", initial: int = 0, flag: bool = True):
    """A tqdm bar on stderr (a no-op object with the same methods when off)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(flag),
                dynamic_ncols=True)
