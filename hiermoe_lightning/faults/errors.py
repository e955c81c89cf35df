"""The exceptions of a job that ends early; each message is one line that names what failed."""

from __future__ import annotations

import signal

__all__ = ["Preempted", "RankDied", "NonFiniteError", "CheckpointError", "PREEMPTED_EXIT_STATUS"]

PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class Preempted(SystemExit):
    """Training stopped at a step boundary because of SIGTERM; a resumable checkpoint was written.

    A ``SystemExit`` with status 143, so an uncaught one ends the process the way a scheduler expects (a job that
    ended by SIGTERM is not "finished"). ``step`` is the global step of the checkpoint, ``checkpoint`` its path.
    """

    def __init__(self, step: int, checkpoint: str | None, signum: int = signal.SIGTERM):
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.step, self.checkpoint, self.signum = int(step), checkpoint, int(signum)

    def __str__(self) -> str:
        where = f"checkpoint {self.checkpoint} written" if self.checkpoint else "no checkpoint path was available"
        return (f"preempted by {signal.Signals(self.signum).name} at step {self.step}: {where}; "
                f"resume with --ckpt_path last")


class RankDied(RuntimeError):
    """A rank process died or raised; the message names the rank, its pid and the cause, in one line.

    ``rank``, ``pid``, ``cause`` and ``log`` (the file holding the full traceback, or None) are attributes.
    """

    def __init__(self, rank: int, pid: int | None, cause: str, step: int | None = None, log: str | None = None):
        self.rank, self.pid, self.cause, self.step, self.log = rank, pid, cause, step, log
        pid_text = f" (pid {pid})" if pid is not None else ""
        step_text = f" during step {step}" if step is not None else ""
        log_text = f" (details: {log})" if log else ""
        super().__init__(f"rank {rank}{pid_text} {cause}{step_text}{log_text}")


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in the loss or a router's logits, raised on every rank before the optimizer step applies it."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, not a checkpoint, a missing shard file, other experts or shapes.

    A ``ValueError`` (bad input): the CLI prints it as one line and exits with status 2.
    """

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"checkpoint {self.path}: {problem}")
