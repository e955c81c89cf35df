"""Per-rank failure reports: what a rank writes when it fails, and how the launcher reads how a rank ended.

A report directory (one per launch, ``<tmp>/hiermoe-fit-<launcher pid>``) holds, for each rank that failed,
``rank<r>.json`` (rank, pid, exception type and message, step) and ``rank<r>.log`` (the full traceback). The launcher
prints one line naming the rank; the log keeps the details, once, instead of N tracebacks on the terminal.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import traceback

__all__ = ["report_dir_for", "write_report", "read_report", "read_reports", "describe_returncode", "is_peer_loss", "cause_of",
           "DETERMINISTIC_ERRORS"]

# errors that every rank raises alike (bad input, a broken checkpoint, a non-finite value): the launcher re-raises
# its own copy instead of naming one rank
DETERMINISTIC_ERRORS = ("ValueError", "TypeError", "CheckpointError", "NonFiniteError", "FloatingPointError")

# what gloo (and NCCL) say on a rank whose peer went away: a consequence, never the root cause
_PEER_LOSS_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                      "recvBytes", "Socket closed", "NCCL communicator was aborted", "ProcessGroupGloo")


def report_dir_for(launcher_pid: int) -> str:
    """The report directory of the launch whose launcher (rank 0's process) has ``launcher_pid``."""
    return os.path.join(tempfile.gettempdir(), f"hiermoe-fit-{launcher_pid}")


def is_peer_loss(text: str) -> bool:
    """True for the error a rank raises because *another* rank went away (lost connection, closed socket)."""
    return any(marker in text for marker in _PEER_LOSS_MARKERS)


def write_report(directory: str, rank: int, exc: BaseException, step: int | None) -> str:
    """Write ``rank<r>.json`` and ``rank<r>.log`` (full traceback) for ``exc``; return the log's path."""
    os.makedirs(directory, exist_ok=True)
    log = os.path.join(directory, f"rank{rank}.log")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    message = " ".join(str(exc).split())
    with open(log, "w") as f:
        f.write(text)
    report = {"rank": rank, "pid": os.getpid(), "type": type(exc).__name__, "message": message, "step": step,
              "peer_loss": is_peer_loss(text), "log": log, "checkpoint": getattr(exc, "checkpoint", None)}
    tmp = os.path.join(directory, f".rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, os.path.join(directory, f"rank{rank}.json"))  # a reader never sees half a report
    return log


def read_report(directory: str | None, rank: int) -> dict | None:
    """The report rank ``rank`` wrote, or None."""
    if not directory:
        return None
    try:
        with open(os.path.join(directory, f"rank{rank}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_reports(directory: str | None) -> dict[int, dict]:
    """Every report in ``directory``, by rank."""
    if not directory or not os.path.isdir(directory):
        return {}
    out = {}
    for name in os.listdir(directory):
        if name.startswith("rank") and name.endswith(".json") and name[4:-5].isdigit():
            report = read_report(directory, int(name[4:-5]))
            if report is not None:
                out[int(name[4:-5])] = report
    return out


def describe_returncode(code: int) -> str:
    """``-9`` -> ``"died: killed by SIGKILL"``, ``3`` -> ``"exited with status 3"`` (Popen/multiprocessing codes)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"died: killed by {name}"
    return f"exited with status {code}"


def cause_of(report: dict | None, returncode: int | None) -> str:
    """One phrase for how a rank ended: its exception (type and message, once) or its exit status / signal."""
    if returncode is not None and returncode < 0:
        return describe_returncode(returncode)
    if report is not None:
        return f"raised {report['type']}: {report['message']}"
    return describe_returncode(returncode) if returncode is not None else "failed"
