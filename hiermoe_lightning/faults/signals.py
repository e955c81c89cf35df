"""A SIGTERM handler that only raises a flag.

Lightning's own SIGTERM handler runs a ``dist.broadcast`` inside the signal handler. A handler runs on whichever rank
got the signal, between two bytecodes of whatever that rank was doing, so ranks that got the signal issue one
collective more than ranks that did not, and the collective sequence no longer matches (gloo: garbage or a hang).
Here the handler sets a flag and nothing else; :mod:`.consensus` makes the ranks agree at the next optimizer step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

__all__ = ["StopFlag", "requeue_slurm_job"]


class StopFlag:
    """Install with :meth:`install` (main thread only; elsewhere it is a no-op), undo with :meth:`restore`.

    ``requested`` is the signal number received (0: none). A second SIGTERM while the first is pending is ignored: the
    first already asks for a checkpoint and an exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = 0
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if not self.requested:
            self.requested = int(signum)

    def install(self) -> bool:
        """Take over the signals; True when installed (only the main thread may install signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.signals:
            previous = signal.signal(signum, self._handler)
            self._previous.setdefault(signum, previous)
        return True

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def requeue_slurm_job() -> str:
    """``scontrol requeue`` this SLURM job (array task aware); return what happened, in words.

    Used for SLURM's requeue signal (``#SBATCH --signal=USR1@90`` with Lightning's ``SLURMEnvironment(auto_requeue=
    True)``) once every rank has written the checkpoint; the job id comes from the scheduler's own environment.
    """
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job or ""):
        return "not requeued: no SLURM job id in the environment"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"requeue of SLURM job {job} failed: {e}"
    return f"requeued SLURM job {job}" if result.returncode == 0 else \
        f"requeue of SLURM job {job} failed: {result.stderr.strip() or result.returncode}"
