"""Fault injection: make a named fault happen at a named point of the code, deterministically.

Tests (and anyone checking a deployment) set ``MVAR_FAULT`` to one fault, optionally at one step of
a training run or one shard index of a data job:

    MVAR_FAULT=abort-after-model-file@20   the checkpoint of step 20: its writer is SIGKILLed after the
                                           model file is written, before the directory is renamed into
                                           place and reported to Ray Train
    MVAR_FAULT=enospc-checkpoint@20        that checkpoint write fails there with ENOSPC (disk full)
    MVAR_FAULT=abort-checkpoint-eval@4     the evaluation of the checkpoint of step 4 (checkpoint_eval): its
                                           process is SIGKILLed before it logs anything (a local run: the
                                           training's process; on Ray Train the validation task's)
    MVAR_FAULT=enospc-shard@1              writing shard 1 of `mvar data synth/pack/tokenize` fails with
                                           ENOSPC before the shard is complete

``MVAR_FAULT_ONCE=PATH`` makes it fire once: the first firing creates PATH, and a fault whose PATH
exists does nothing (so a worker group restarted by Ray Train does not meet the same fault again).
A training driver forwards both variables to its Ray workers (`mvar.training.launch`). Without
``MVAR_FAULT`` every point is a dictionary lookup and nothing else.
"""
from __future__ import annotations

import errno
import logging
import os
import signal

log = logging.getLogger(__name__)

FAULT_ENV, ONCE_ENV = "MVAR_FAULT", "MVAR_FAULT_ONCE"

# fault name -> (the point where it fires, what it does there)
FAULTS = {
    "abort-after-model-file": ("checkpoint-model-written", "abort"),
    "enospc-checkpoint": ("checkpoint-model-written", "enospc"),
    "enospc-shard": ("shard-data-written", "enospc"),
    "abort-checkpoint-eval": ("checkpoint-eval", "abort"),
}


def parse(spec: str) -> tuple[str, int | None]:
    """'NAME' or 'NAME@N' -> (NAME, N or None); an unknown name or a bad N is a ValueError naming both."""
    name, _, at = spec.strip().partition("@")
    if name not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown fault '{name}' (known: {', '.join(sorted(FAULTS))})")
    if not at:
        return name, None
    if not at.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: '@{at}' must be a step or shard index, e.g. {name}@20")
    return name, int(at)


def forwarded_env() -> dict[str, str]:
    """The fault variables of this process, for the environment of its Ray workers."""
    return {k: os.environ[k] for k in (FAULT_ENV, ONCE_ENV) if os.environ.get(k)}


def point(where: str, index: int) -> None:
    """Fire the configured fault if it belongs to point ``where`` at ``index`` (a step, a shard)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, at = parse(spec)
    fires_at, action = FAULTS[name]
    if fires_at != where or (at is not None and at != index) or not _first_time():
        return
    log.warning("fault injected (%s=%s) at %s %d", FAULT_ENV, spec, where, index)
    if action == "abort":
        os.kill(os.getpid(), signal.SIGKILL)  # a kill, not an exception: no cleanup code runs
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV}={spec})")


def _first_time() -> bool:
    path = os.environ.get(ONCE_ENV)
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
