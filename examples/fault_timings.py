"""How fast ``hiermoe fit`` ends when a job is preempted or a rank dies (the reliability issue's measurements).

For each repetition it starts the tiny 4-rank ``"2x2"`` fit (``hiermoe_lightning.testing.fit_process``), waits until
training runs, then either sends SIGTERM to the launcher (a scheduler's preemption) and times the checkpoint and the
exit, or SIGKILLs rank 2 and times until no process of the job is left. Medians over the repetitions, as JSON::

    python examples/fault_timings.py --repeats 3 --json docs/results/fault_timings.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

from hiermoe_lightning.testing.fit_process import start, stderr_lines, wait_for_file, write_config
from hiermoe_lightning.testing.processes import alive, children, kill_session, wait_for


def _started(root: str):
    write_config(root)
    proc = start(root)
    if not wait_for(lambda: len(children(proc.pid)) >= 3, 120) or \
            not wait_for_file(os.path.join(root, "ckpt", "last.ckpt"), 180):
        kill_session(proc)
        raise RuntimeError(f"the fit did not start: {stderr_lines(root)[-3:]}")
    return proc, children(proc.pid)


def preempt_once(root: str) -> dict:
    proc, ranks = _started(root)
    last = os.path.join(root, "ckpt", "last.ckpt")
    before = os.path.getmtime(last)
    try:
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(120)
        exited = time.time()
        wait_for(lambda: not any(alive(p) for p in ranks), 10)
        all_gone = time.time()
        written = os.path.getmtime(last)
    finally:
        kill_session(proc)
    return {"status": status, "checkpoint_s": written - sent if written > before else None,
            "exit_s": exited - sent, "all_gone_s": all_gone - sent, "line": stderr_lines(root)[-1]}


def kill_rank_once(root: str) -> dict:
    proc, ranks = _started(root)
    try:
        victim = sorted(ranks)[1]  # local rank 2
        sent = time.time()
        os.kill(victim, signal.SIGKILL)
        status = proc.wait(120)
        wait_for(lambda: not any(alive(p) for p in ranks), 10, poll=0.02)
        gone = time.time()
    finally:
        kill_session(proc)
    return {"status": status, "all_gone_s": gone - sent, "line": stderr_lines(root)[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    runs = {"sigterm": [], "sigkill_rank2": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="hiermoe-faults-") as root:
            runs["sigterm"].append(preempt_once(root))
        with tempfile.TemporaryDirectory(prefix="hiermoe-faults-") as root:
            runs["sigkill_rank2"].append(kill_rank_once(root))

    def median(kind, key):
        values = [r[key] for r in runs[kind] if r[key] is not None]
        return round(statistics.median(values), 3) if values else None

    result = {"config": "tiny MoEGPT, 4 CPU ranks, topology 2x2, dispatch auto, swaps every 5 steps",
              "repeats": args.repeats,
              "sigterm": {"median_checkpoint_written_s": median("sigterm", "checkpoint_s"),
                          "median_exit_s": median("sigterm", "exit_s"),
                          "median_all_ranks_gone_s": median("sigterm", "all_gone_s"),
                          "statuses": [r["status"] for r in runs["sigterm"]]},
              "sigkill_rank2": {"median_all_gone_s": median("sigkill_rank2", "all_gone_s"),
                                "max_all_gone_s": round(max(r["all_gone_s"] for r in runs["sigkill_rank2"]), 3),
                                "statuses": [r["status"] for r in runs["sigkill_rank2"]]},
              "last_lines": {"sigterm": runs["sigterm"][-1]["line"], "sigkill_rank2": runs["sigkill_rank2"][-1]["line"]},
              "runs": runs}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
