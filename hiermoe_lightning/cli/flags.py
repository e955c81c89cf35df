"""Small validators shared by the command-line subcommands (run in the parent, before any rank starts)."""

from __future__ import annotations

import argparse

from ..topology import Topology
from ..validation import check_int

__all__ = ["int_flag", "topology_flag", "add_timeout_and_json"]

int_flag = check_int  # ``int_flag(value, "--flag", low)``: the flag's value as an int >= low, errors name the flag


def topology_flag(text: object) -> Topology:
    """``--topology`` parsed; a bad value raises the parser's TypeError/ValueError prefixed with the flag."""
    try:
        return Topology.parse(text)
    except (TypeError, ValueError) as e:
        raise type(e)(f"--topology: {e}") from None


def add_timeout_and_json(p: argparse.ArgumentParser, timeout: float) -> None:
    """``--timeout`` (one deadline for every launch of the command) and ``--json``: the flags of a bench that starts
    ranks itself."""
    p.add_argument("--timeout", type=float, default=timeout,
                   help="seconds for the whole command; when they pass, every rank is stopped (exit status 124)")
    p.add_argument("--json", action="store_true")
