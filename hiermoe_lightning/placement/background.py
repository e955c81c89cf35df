"""Run a planning job beside training: one daemon thread per job, one torch intra-op thread inside it.

``HierMoECallback`` plans off the critical path: it snapshots the statistics at a step boundary, starts a
:class:`PlanningJob` (the planner is a pure function of the snapshot), keeps training, and collects the result at a
later, fixed step boundary. The job's torch ops run on a single intra-op thread (``torch.set_num_threads`` is
per-thread), so it takes one core at most and never the compute threads' pool; torch releases the GIL inside its ops,
so the training thread keeps running. The thread also lowers its own scheduling priority (``nice`` 19, Linux
threads have their own): where the cores are oversubscribed (ranks sharing a CPU) it runs in the time training
leaves idle, waiting on the network, instead of slowing the ranks down. ``background=False`` runs the job inline
(the step waits, as before).

A job never raises into the thread: :meth:`PlanningJob.wait` returns ``(ok, result or "Type: message")`` so the
caller can share a failure with the other ranks before raising it on every rank.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import torch

__all__ = ["PlanningJob"]

BACKGROUND_NICE = 19  # the lowest priority: the planning thread runs when training leaves a core idle


def _lower_priority() -> None:
    """Lower the calling thread's priority (Linux: ``setpriority`` on its thread id applies to that thread alone);
    where that is not possible the job simply runs at normal priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass


class PlanningJob:
    """``fn()`` on a daemon thread (``background=True``) or right away (``False``).

    After :meth:`wait`: ``cpu_seconds`` (the job's own CPU time: what it took from training in the background),
    ``wall_seconds`` (start to finish) and ``waited_seconds`` (how long :meth:`wait` blocked the caller)."""

    def __init__(self, fn: Callable[[], Any], *, background: bool, name: str = "hiermoe-planner"):
        self._fn = fn
        self._outcome: tuple[bool, Any] | None = None
        self.cpu_seconds = self.wall_seconds = self.waited_seconds = 0.0
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()
        else:
            self._run(threads=None)
            self.waited_seconds = self.wall_seconds  # the caller waited for all of it

    def _run(self, threads: int | None = 1) -> None:
        if threads is not None:
            torch.set_num_threads(threads)  # this thread's pool only: the training threads keep theirs
            _lower_priority()
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self._outcome = (True, self._fn())
        except Exception as e:  # noqa: BLE001 - handed to the caller, who raises it on every rank
            self._outcome = (False, f"{type(e).__name__}: {e}")
        finally:
            self.cpu_seconds = time.thread_time() - cpu
            self.wall_seconds = time.perf_counter() - wall

    @property
    def done(self) -> bool:
        return self._outcome is not None

    def wait(self) -> tuple[bool, Any]:
        """Block until the job has finished; ``(True, result)`` or ``(False, "ErrorType: message")``."""
        if self._thread is not None:
            start = time.perf_counter()
            self._thread.join()
            self.waited_seconds = time.perf_counter() - start
            self._thread = None
        assert self._outcome is not None
        return self._outcome
