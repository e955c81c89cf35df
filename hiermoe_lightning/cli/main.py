"""The ``hiermoe`` command line (also ``python -m hiermoe_lightning``).

Subcommands::

    hiermoe fit|validate|test --config FILE.yaml [overrides]   # LightningCLI (hiermoe_lightning.cli.lightning_cli)
    hiermoe plan ...                                            # cost-model report (cli/plan.py)
    hiermoe bench comm ...                                      # dispatch+combine micro-benchmark (bench/comm.py)
    hiermoe bench layer ...                                     # one sharded MoELayer, time split (bench/layer.py)

Errors (contract, "Errors"): bad input (``ValueError`` / ``TypeError``) and argparse errors print ONE line
``hiermoe: error: <message>`` on stderr and exit with status 2, without a traceback. ``--debug`` (before the
subcommand, or after ``plan`` / ``bench <name>``) re-raises instead. A :class:`CLIError` carries its own exit status
(e.g. 3 for "network emulation is not available").

``fit|validate|test`` hand everything after the subcommand untouched to
``hiermoe_lightning.cli.lightning_cli.run_lightning_cli(subcommand, argv)``; there ``--debug`` is only recognised
before the subcommand (``hiermoe --debug fit --config ...``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main", "build_parser", "CLIError", "LIGHTNING_COMMANDS"]

PROG = "hiermoe"
LIGHTNING_COMMANDS = ("fit", "validate", "test")
# options of the top-level parser that may come before the subcommand (anything else there is an error)
_GLOBAL_FLAGS = ("--debug",)


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
    sub = parser.add_subparsers(dest="command", metavar="{fit,validate,test,plan,bench}", required=True)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, add_help=False, help=f"LightningCLI {name}: hiermoe {name} --config FILE.yaml [overrides]")

    p = sub.add_parser("plan", help="cost-model report: predicted all-to-all time of every dispatch",
                       description="The cost model's report for one routing (contract: `hiermoe plan`).")
    plan_cmd.add_arguments(p)
    _add_debug(p)
    p.set_defaults(func=plan_cmd.run)

    import importlib

    benches = {  # name -> (module, one-line help)
        "comm": ("comm", "time dispatch+combine of every dispatch on spawned gloo ranks"),
        "layer": ("layer", "forward+backward of one sharded MoELayer, time split"),
        "e2e": ("e2e", "tokens/s of training the bundled model per dispatch, with and without swaps"),
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
    except (ValueError, TypeError) as e:
        if debug:
            raise
        _error(str(e))
        return 2
    return 0 if status is None else int(status)


def _rank_failure_line(err: Exception) -> str:
    """The last line of a rank's traceback (the exception itself), prefixed by which rank failed."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return "a rank failed"
    head = lines[0].rstrip(":")
    return head if len(lines) == 1 else f"{head}: {lines[-1]}"


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

    from ..testing.launch import RankFailure

    try:
        status = args.func(args)
    except (ValueError, TypeError) as e:
        if debug:
            raise
        _error(str(e))
        return 2
    except CLIError as e:
        if debug:
            raise
        _error(str(e))
        return e.status
    except RankFailure as e:
        if debug:
            raise
        _error(f"{_rank_failure_line(e)} (rerun with --debug for the rank's traceback)")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    return 0 if status is None else int(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
