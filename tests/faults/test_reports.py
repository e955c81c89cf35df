"""The pure parts of fault handling: how a process ended, in words; which failure is the root cause; the signal flag."""

from __future__ import annotations

import os
import signal

import pytest

from hiermoe_lightning.faults import NonFiniteError, Preempted, RankDied
from hiermoe_lightning.faults.launchers import translate_process_failure
from hiermoe_lightning.faults.reports import cause_of, describe_returncode, read_reports, write_report
from hiermoe_lightning.faults.signals import StopFlag
from hiermoe_lightning.faults.supervisor import exit_status_for, resolve_failure


def test_describe_returncode():
    assert describe_returncode(-9) == "died: killed by SIGKILL"
    assert describe_returncode(-15) == "died: killed by SIGTERM"
    assert describe_returncode(7) == "exited with status 7"
    assert cause_of(None, -11) == "died: killed by SIGSEGV"
    assert cause_of({"type": "KeyError", "message": "'x'"}, 1) == "raised KeyError: 'x'"


def _raise(exc):
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001
        return e


def test_reports_round_trip_and_mark_peer_loss(tmp_path):
    d = str(tmp_path)
    log = write_report(d, 2, _raise(RuntimeError("boom\n  second line")), step=7)
    write_report(d, 1, _raise(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection reset by peer")), 7)
    reports = read_reports(d)
    assert sorted(reports) == [1, 2]
    assert reports[2]["message"] == "boom second line" and reports[2]["step"] == 7 and not reports[2]["peer_loss"]
    assert reports[1]["peer_loss"]
    assert "Traceback" in open(log).read()


def test_translate_prefers_the_rank_whose_failure_is_its_own(tmp_path):
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    d = str(tmp_path)
    write_report(d, 1, _raise(RuntimeError("Connection reset by peer")), 3)
    write_report(d, 3, _raise(KeyError("expert 9")), 3)
    error = translate_process_failure(ProcessRaisedException("...", 1, 111), d)
    assert isinstance(error, RankDied) and error.rank == 3 and "raised KeyError: 'expert 9'" in str(error)
    # a rank killed by a signal wrote nothing: its exit says it all
    error = translate_process_failure(ProcessExitedException("...", 2, 222, -9, "SIGKILL"), str(tmp_path / "none"))
    assert str(error) == "rank 2 (pid 222) died: killed by SIGKILL"
    # every rank's common bad input comes back as that error, preemption as Preempted (status 143)
    write_report(d, 0, _raise(ValueError("checkpoint x: truncated")), 0)
    assert type(translate_process_failure(ProcessRaisedException("...", 0, 1), d)) is ValueError
    assert isinstance(translate_process_failure(ProcessExitedException("...", 0, 1, 143), str(tmp_path / "n")),
                      Preempted)


def test_resolve_failure_and_exit_status():
    root = RankDied(2, 99, "died: killed by SIGKILL", 5)
    assert resolve_failure(RuntimeError("Connection reset by peer"), root, 0, 5, None) is root
    mine = resolve_failure(RuntimeError("bad"), None, 0, 5, "/tmp/log")
    assert str(mine) == f"rank 0 (pid {os.getpid()}) raised RuntimeError: bad during step 5 (details: /tmp/log)"
    value = ValueError("x")
    assert resolve_failure(value, root, 0, 5, None) is value  # every rank fails alike: the error itself
    assert exit_status_for(Preempted(3, "p")) == 143
    assert exit_status_for(NonFiniteError("nan")) == 2 and exit_status_for(ValueError()) == 2
    assert exit_status_for(RuntimeError()) == 1


def test_stop_flag_only_raises_a_flag_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag()
    assert flag.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a second one changes nothing
        assert flag.requested == signal.SIGTERM
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_preempted_is_a_system_exit_143_with_one_line():
    stop = Preempted(12, "/ckpt/last.ckpt")
    assert isinstance(stop, SystemExit) and stop.code == 143
    assert str(stop) == ("preempted by SIGTERM at step 12: checkpoint /ckpt/last.ckpt written; "
                         "resume with --ckpt_path last")
    with pytest.raises(SystemExit):
        raise stop
