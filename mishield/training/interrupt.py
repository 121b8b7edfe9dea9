"""How a training run stops early: divergence, Ctrl-C (exit 130) and preemption by SIGTERM (exit 143).

Every trainer (target fine-tuning, prior training, evaluation-model training) writes its
resumable state after each completed epoch. When it is stopped, the state of the last completed
epoch is what `--resume` continues from. SIGTERM is what schedulers (Slurm, Kubernetes, systemd)
send before killing a job; while training runs, `preemptible()` turns it into the same clean
stop as Ctrl-C, with its own exit code 143 (128 + SIGTERM, the shell's convention), so a
pipeline can tell "preempted, resume me" from "a person pressed Ctrl-C" (130).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from mishield.errors import MishieldError


class TrainingDiverged(MishieldError):
    """The loss became NaN or infinite; the last good state is kept."""

    exit_code = 1


class TrainingInterrupted(MishieldError):
    """Ctrl-C during training; the last completed epoch is saved and resumable."""

    exit_code = 130


class TrainingPreempted(TrainingInterrupted):
    """SIGTERM during training (a scheduler's preemption); the last completed epoch is resumable."""

    exit_code = 143


class Preempted(KeyboardInterrupt):
    """Raised inside the training loop by the SIGTERM handler `preemptible()` installs."""


@contextlib.contextmanager
def preemptible() -> Iterator[None]:
    """Turn SIGTERM into `Preempted` while the block runs, then restore the previous handler.

    Only the main thread may install signal handlers; elsewhere (a notebook's worker thread)
    the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Preempted

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def interrupted(err: KeyboardInterrupt, where: str, state_path: Path | None) -> TrainingInterrupted:
    """The one-sentence error for a run stopped by Ctrl-C or SIGTERM, saying how to resume it."""
    if state_path is not None and Path(state_path).exists():
        advice = (f"the state after the last completed epoch is in {state_path} — rerun the same "
                  "command with `resume` to continue")
    elif state_path is not None:
        advice = "no epoch had finished, so nothing was saved — rerun the same command to start again"
    else:
        advice = "no state file was asked for, so the run cannot be resumed"
    if isinstance(err, Preempted):
        return TrainingPreempted(f"training stopped by SIGTERM in {where}; {advice}.")
    return TrainingInterrupted(f"training interrupted in {where}; {advice}.")
