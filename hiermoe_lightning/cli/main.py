"""The ``hiermoe`` command line (also ``python -m hiermoe_lightning``).

Subcommands::

    hiermoe fit|validate|test --config FILE.yaml [overrides]   # LightningCLI (hiermoe_lightning.cli.lightning_cli)
    hiermoe plan ...                                            # cost-model report (cli/plan.py)
    hiermoe bench comm ...                                      # dispatch+combine micro-benchmark (bench/comm.py)
    hiermoe bench layer ...                                     # one sharded MoELayer, time split (bench/layer.py)
    hiermoe bench build ...                                     # build + shard_ time and memory (bench/build.py)
    hiermoe bench scaleout ...                                  # EP inside DP, FSDP dense (bench/scaleout.py)

Errors (contract, "Errors"): bad input (``ValueError`` / ``TypeError``) and argparse errors print ONE line
``hiermoe: error: <message>`` on stderr and exit with status 2, without a traceback. ``--debug`` (before the
subcommand, or after ``plan`` / ``bench <name>``) re-raises instead. A :class:`CLIError` carries its own exit status
(e.g. 3 for "network emulation is not available").

Commands that start ranks themselves (``bench ...``) end the same way whatever stops them: SIGTERM / SIGINT print
``hiermoe: interrupted by SIGTERM; 4 ranks stopped`` and exit with 143 / 130; an expired ``--timeout`` prints one
line naming it and exits with 124; a failed rank prints ``hiermoe: error: rank 2 (pid 1234) died: killed by SIGKILL
(tracebacks: <log>)`` and exits with 1 (``--debug``: the traceback instead). In every case no rank is left running.

``fit|validate|test`` hand everything after the subcommand untouched to
``hiermoe_lightning.cli.lightning_cli.run_lightning_cli(subcommand, argv)``; there ``--debug`` is only recognised
before the subcommand (``hiermoe --debug fit --config ...``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser", "CLIError", "LIGHTNING_COMMANDS", "TIMEOUT_EXIT_STATUS"]

PROG = "hiermoe"
LIGHTNING_COMMANDS = ("fit", "validate", "test")
# options of the top-level parser that may come before the subcommand (anything else there is an error)
_GLOBAL_FLAGS = ("--debug",)
TIMEOUT_EXIT_STATUS = 124  # a command's --timeout expired (as coreutils' timeout(1) reports it)


class CLIError(Exception):
    """A failure the CLI reports as one line with its own exit status (not a bad-input error)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = int(status)


class _ArgumentError(Exception):
    """Raised by :class:`_Parser` instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise (main prints them as one line); subparsers inherit the class."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise _ArgumentError(message)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hiermoe-lightning")
    except Exception:  # noqa: BLE001 - not installed as a distribution: fall back to the package attribute
        from .. import __version__

        return __version__


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subparser must not reset a --debug given before the subcommand
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error instead of one line")


def build_parser() -> argparse.ArgumentParser:
    """The full parser (fit/validate/test appear for ``--help`` only: :func:`main` forwards them before parsing)."""
    from . import plan as plan_cmd

    parser = _Parser(prog=PROG, description="Hierarchical, token-deduplicated expert-parallel MoE for PyTorch "
                                            "Lightning (after HierMoE).")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,plan,export,bench}", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, add_help=False, help=f"LightningCLI {name}: hiermoe {name} --config FILE.yaml [overrides]")

    p = sub.add_parser("plan", help="cost-model report: predicted all-to-all time of every dispatch",
                       description="The cost model's report for one routing (contract: `hiermoe plan`).")
    plan_cmd.add_arguments(p)
    _add_debug(p)
    p.set_defaults(func=plan_cmd.run)

    from . import export as export_cmd

    p = sub.add_parser("export", help="a trained Hugging Face model's checkpoint as a Hugging Face directory",
                       description=(export_cmd.__doc__ or "").strip().splitlines()[0])
    export_cmd.add_arguments(p)
    _add_debug(p)
    p.set_defaults(func=export_cmd.run)

    import importlib

    benches = {  # name -> (module, one-line help)
        "comm": ("comm", "time dispatch+combine of every dispatch on spawned gloo ranks"),
        "layer": ("layer", "forward+backward of one sharded MoELayer, time split"),
        "build": ("build", "per-rank build time and peak memory: every expert then shard_, against device='meta'"),
        "e2e": ("e2e", "tokens/s of training the bundled model per dispatch, with and without swaps"),
        "scaleout": ("scaleout", "expert parallelism inside data parallelism and FSDP dense sharding: speed, memory"),
        "placement": ("placement", "swap planner vs no swap, EPLB-style and SmartMoE-style placements"),
        "simulate": ("simulate", "paper-scale predictions with the cost model, beside the paper's table"),
    }
    bench = sub.add_parser("bench", help=f"benchmarks ({', '.join(benches)})")
    bsub = bench.add_subparsers(dest="bench_command", metavar="{" + ",".join(benches) + "}", required=True)
    for name, (module_name, help_text) in benches.items():
        try:
            module = importlib.import_module(f"..bench.{module_name}", __package__)
        except ModuleNotFoundError as e:  # only a benchmark module that is absent from this install is left out
            if e.name != f"hiermoe_lightning.bench.{module_name}":
                raise
            continue
        b = bsub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(b)
        _add_debug(b)
        b.set_defaults(func=module.main)
    return parser


def _error(message: str) -> None:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {text}", file=sys.stderr)


def _split_lightning(argv: list[str]) -> "tuple[str, list[str], bool] | None":
    """``[--debug] fit <rest>`` -> ("fit", rest, debug); None when the first command is not fit/validate/test."""
    debug = False
    for i, tok in enumerate(argv):
        if tok in _GLOBAL_FLAGS:
            debug = True
            continue
        if tok in LIGHTNING_COMMANDS:
            return tok, list(argv[i + 1:]), debug
        return None
    return None


def _run_lightning(command: str, rest: list[str], debug: bool) -> int:
    try:
        from .lightning_cli import run_lightning_cli
    except ImportError as e:
        if debug:
            raise
        _error(f"'{PROG} {command}' is not available: hiermoe_lightning.cli.lightning_cli could not be imported ({e})")
        return 2
    try:
        status = run_lightning_cli(command, rest)
    except BaseException as e:  # noqa: BLE001 - mapped to one line and a status, or re-raised
        return _exit_status(e, debug)
    return 0 if status is None else int(status)


def _exit_status(e: BaseException, debug: bool) -> int:
    """The one line and the exit status of every way a command can end early (the same table for fit|validate|test
    and plan|bench); anything else, or any error with ``--debug``, is re-raised with its traceback."""
    from ..faults import NonFiniteError, Preempted, RankDied
    from ..testing.launch import RankFailure, RanksInterrupted, RanksTimeout

    if isinstance(e, (Preempted, RanksInterrupted)):  # stopped by a signal, as asked: not an error
        print(f"{PROG}: {e}", file=sys.stderr)  # "hiermoe: preempted by SIGTERM at step 148: ..." / "interrupted ..."
        return e.code
    if isinstance(e, KeyboardInterrupt):
        _error("interrupted")
        return 130
    table = [((ValueError, TypeError), lambda: str(e), 2),  # bad input
             ((CLIError,), lambda: str(e), getattr(e, "status", 1)),
             ((RanksTimeout,), lambda: _rank_failure_line(e, "stacks"), TIMEOUT_EXIT_STATUS),
             ((RankFailure,), lambda: _rank_failure_line(e), 1),
             ((RankDied, NonFiniteError), lambda: str(e), 1)]
    for types, line, status in table:
        if isinstance(e, types):
            if debug:
                raise e
            _error(line())
            return status
    raise e


def _rank_failure_line(err: Exception, log_holds: str = "tracebacks") -> str:
    """One line for a failed launch: the launcher's summary (which rank, its pid, what happened) and, when there is
    one, the report that holds every rank's ``log_holds``."""
    summary = getattr(err, "summary", None) or (str(err).splitlines() or ["a rank failed"])[0]
    log_path = getattr(err, "log_path", None)
    return f"{summary} ({log_holds}: {log_path})" if log_path else summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hiermoe`` command line on ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug_flag = "--debug" in argv

    lightning = _split_lightning(argv)
    if lightning is not None:
        return _run_lightning(*lightning)

    try:
        args = build_parser().parse_args(argv)
    except _ArgumentError as e:
        _error(str(e))
        return 2
    debug = bool(getattr(args, "debug", False)) or debug_flag

    from ..testing.launch import stop_on_signals

    try:
        with stop_on_signals():  # SIGTERM/SIGINT anywhere in the command: ranks stopped, temporary files removed
            status = args.func(args)
    except BaseException as e:  # noqa: BLE001 - mapped to one line and a status, or re-raised
        return _exit_status(e, debug)
    return 0 if status is None else int(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
