"""Lightning launchers that name a failed rank in one line and leave no rank behind.

* :class:`SupervisedScriptLauncher` (``start_method="popen"``, what ``hiermoe fit`` uses): rank 0 is this process,
  ranks 1.. are re-runs of the command, watched by :class:`~.supervisor.RankWatcher`.
* :func:`translate_process_failure` (fork/spawn): turns ``torch.multiprocessing``'s "process 2 terminated with
  ..." into the same one-line errors, using the ranks' reports.

Lightning internals used here (listed with the others in :mod:`hiermoe_lightning.strategy`'s docstring): the private
``_SubprocessScriptLauncher`` (its ``cluster_environment``, ``num_processes``, ``num_nodes``, ``procs`` and
``_call_children_scripts``) and ``lightning.fabric.strategies.launchers.subprocess_script._set_num_threads_if_needed``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from typing import Any, Callable

from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

from .errors import NonFiniteError, Preempted, RankDied
from .reports import describe_returncode, read_reports, report_dir_for
from .supervisor import SUPERVISOR_ENV, RankWatcher, die_with_parent, looks_like_peer_loss, resolve_failure

__all__ = ["SupervisedScriptLauncher", "adopt_supervisor", "translate_process_failure"]


def adopt_supervisor() -> tuple[str | None, bool]:
    """In a rank process started by :class:`SupervisedScriptLauncher`: die with the launcher (PDEATHSIG) and
    return ``(report directory, True)``; elsewhere ``(None, False)``."""
    report_dir = os.environ.get(SUPERVISOR_ENV)
    if not report_dir or os.environ.get("LOCAL_RANK", "0") == "0":
        return None, False
    die_with_parent()
    return report_dir, True


class SupervisedScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher with a watcher that names the rank that died and a launcher that waits for
    (or kills) every rank before it returns or raises."""

    def __init__(self, strategy, cluster_environment, num_processes: int, num_nodes: int):
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._strategy = strategy

    @override
    def launch(self, function: Callable, *args: Any, trainer=None, **kwargs: Any) -> Any:
        from lightning.fabric.strategies.launchers.subprocess_script import _set_num_threads_if_needed

        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if trainer is not None:
            from ..checkpoint_files import use_newest_for_last

            use_newest_for_last(trainer)  # ckpt_path="last": the newest complete checkpoint, on every rank
        if self.cluster_environment.creates_processes_externally:
            # torchrun, SLURM, or a rank we started ourselves: whoever started the processes supervises them
            _set_num_threads_if_needed(num_processes=self.num_processes)
            return function(*args, **kwargs)
        report_dir = report_dir_for(os.getpid())
        shutil.rmtree(report_dir, ignore_errors=True)
        os.makedirs(report_dir)
        self._strategy._report_dir = report_dir
        os.environ[SUPERVISOR_ENV] = report_dir  # copied into the children's environment, like LOCAL_RANK
        try:
            self._call_children_scripts()
        finally:
            os.environ.pop(SUPERVISOR_ENV, None)
        first = self.cluster_environment.node_rank() * self.num_processes
        watcher = RankWatcher(self.procs, [first + i for i in range(1, self.num_processes)], report_dir,
                              step=lambda: trainer.global_step if trainer is not None else None)
        watcher.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        try:
            result = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every way out must stop the ranks first
            raise self._failure(exc, watcher, trainer, report_dir) from None
        # the other ranks now run the rest of the script beside this one (a test, a checkpoint after fit: more
        # collectives), so they are waited for when this process exits, not here; the watcher keeps watching
        atexit.register(_wait_for_ranks_at_exit, watcher, report_dir)
        _note_uncaught_errors()
        return result

    def _failure(self, exc: BaseException, watcher: RankWatcher, trainer, report_dir: str) -> BaseException:
        if isinstance(exc, Preempted):
            watcher.stop()
            watcher.wait_children(timeout=60.0)  # every rank saves the same checkpoint and exits 143
            shutil.rmtree(report_dir, ignore_errors=True)
            return exc
        root = watcher.root_cause(timeout=5.0 if looks_like_peer_loss(exc) else 0.5)
        watcher.kill_all()
        watcher.wait_children(timeout=5.0)
        log = os.path.join(report_dir, f"rank{self._strategy.global_rank}.log")
        step = trainer.global_step if trainer is not None else None
        error = resolve_failure(exc, root, self._strategy.global_rank, step, log if os.path.exists(log) else None)
        if isinstance(error, RankDied) and error.log is None:
            error = RankDied(error.rank, error.pid, error.cause, error.step, report_dir)  # the survivors' logs
        return error


_EXITING_WITH_ERROR = [False]  # set by the excepthook below: rank 0 is ending on an uncaught exception


def _note_uncaught_errors() -> None:
    """Chain ``sys.excepthook`` once so :func:`_wait_for_ranks_at_exit` knows rank 0 is failing (then the other
    ranks may be stuck in a collective it will never join: waiting for them would only delay the exit)."""
    if getattr(sys.excepthook, "_hiermoe", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        _EXITING_WITH_ERROR[0] = True
        previous(exc_type, exc, tb)

    hook._hiermoe = True
    sys.excepthook = hook


def _wait_for_ranks_at_exit(watcher: RankWatcher, report_dir: str) -> None:
    """At rank 0's exit: give the other ranks time to finish the script (120 s; 5 s when rank 0 ends on an error),
    then kill whatever is left, so none outlives the launcher."""
    watcher.stop()
    watcher.wait_children(timeout=5.0 if _EXITING_WITH_ERROR[0] else 120.0)
    shutil.rmtree(report_dir, ignore_errors=True)


def translate_process_failure(exc: BaseException, report_dir: str) -> BaseException:
    """``torch.multiprocessing``'s ``ProcessRaisedException`` / ``ProcessExitedException`` as the one-line error a
    user can act on: ``Preempted`` (status 143), the ranks' common ``ValueError`` / ``TypeError`` /
    ``NonFiniteError``, or a :class:`RankDied` naming the root-cause rank, its pid and the cause."""
    index = getattr(exc, "error_index", 0)
    pid = getattr(exc, "error_pid", None)
    code = getattr(exc, "exit_code", None)
    reports = read_reports(report_dir)
    report = reports.get(index)
    if (report or {}).get("type") == "Preempted" or code == Preempted(0, None).code:
        step = (report or {}).get("step") or 0
        return Preempted(step, (report or {}).get("checkpoint"))
    if report is not None and report.get("peer_loss"):
        # the first rank to fail only lost its peer: prefer a rank whose failure is its own
        primary = [r for r, rep in sorted(reports.items()) if not rep.get("peer_loss")]
        if primary:
            index, report = primary[0], reports[primary[0]]
            pid = report.get("pid")
    if report is not None:
        kind, message = report["type"], report["message"]
        if kind in ("ValueError", "CheckpointError"):
            return ValueError(message)
        if kind == "TypeError":
            return TypeError(message)
        if kind in ("NonFiniteError", "FloatingPointError"):
            return NonFiniteError(message)
        return RankDied(index, report.get("pid", pid), f"raised {kind}: {message}", report.get("step"),
                        report.get("log"))
    cause = describe_returncode(code) if code is not None else f"failed: {' '.join(str(exc).split())[:200]}"
    signal_name = getattr(exc, "signal_name", None)
    if signal_name:
        cause = f"died: killed by {signal_name}"
    return RankDied(index, pid, cause)
