"""The Transport seam: one choice per group from its facts, tag ranges that never overlap, and a runner that asks
the transport (not its type) how many exchanges may be in flight."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.dispatch import engine
from hiermoe_lightning.dispatch.comm import PeerGroup, start_exchange
from hiermoe_lightning.dispatch.transport import (CollectiveTransport, PointToPointTransport, SharedMemoryTransport,
                                                  Transport, transport_for)


def test_a_group_gets_its_transport_from_its_facts_or_from_the_caller():
    assert isinstance(transport_for(False, None), CollectiveTransport)
    assert isinstance(transport_for(True, None), PointToPointTransport)
    assert isinstance(transport_for(True, object()), SharedMemoryTransport)
    assert isinstance(PeerGroup(None, 1, 0, (0,), receive_first=True).transport, PointToPointTransport)
    custom = PointToPointTransport()
    assert PeerGroup(None, 1, 0, (0,), shm=object(), custom_transport=custom).transport is custom


@pytest.mark.parametrize("transport", [CollectiveTransport(), PointToPointTransport(), SharedMemoryTransport(object())])
def test_an_exchange_stays_inside_its_own_tags(transport):
    assert isinstance(transport, Transport)
    assert 1 <= transport.max_payloads <= transport.tags_per_exchange
    if isinstance(transport, SharedMemoryTransport):  # its acknowledgement: above every payload, inside the range
        assert transport.max_payloads <= transport._ack_tag < transport.tags_per_exchange
        assert transport.max_in_flight(True) == transport.max_in_flight(False) == 1  # buffers alternate by parity
        assert transport.counts_ride_along(torch.zeros(1)) and not transport.counts_ride_along(torch.zeros(1, device="meta"))
    else:
        assert transport.max_in_flight(True) is None and transport.max_in_flight(False) == 1
        assert not transport.counts_ride_along(torch.zeros(1))


def test_an_exchange_with_more_payloads_than_the_transport_takes_is_refused():
    peers = PeerGroup(None, 1, 0, (0,), shm=object())
    payload = (torch.zeros(1, 2), [1], [1])
    with pytest.raises(ValueError, match="shared-memory transport holds at most 7 payloads, got 8"):
        start_exchange([payload] * 8, peers)


class _OneAtATime(PointToPointTransport):
    """A socket transport that never queues two exchanges on a group, even on the slowest link."""

    name = "one at a time"
    tags_per_exchange = 4

    def max_in_flight(self, slowest_link):
        return 1


def _program(peers, log, name):
    for step in range(2):
        (out,) = yield engine._Exchange(peers, [(torch.tensor([[step]]), [1], [1])], 1)
        log.append((name, int(out)))
    return name


@pytest.mark.parametrize("transport, posted_expected", [
    (PointToPointTransport(), [0, 8, 16, 24]),  # both chunks' exchanges queue back to back on the slowest link
    (_OneAtATime(), [0, 4, 8, 12]),  # the runner asks: one at a time, and 4 tags per exchange
])
def test_the_runner_asks_the_transport_for_tags_and_exchanges_in_flight(monkeypatch, transport, posted_expected):
    posted, in_flight, peak = [], [0], [0]
    real = engine.start_exchange

    def recording(payloads, peers, tag=0):
        posted.append(tag)
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        pending = real(payloads, peers, tag)
        wait = pending.wait

        def counted_wait():
            in_flight[0] -= 1
            return wait()

        pending.wait = counted_wait
        return pending

    monkeypatch.setattr(engine, "start_exchange", recording)
    peers = PeerGroup("inter", 1, 0, (0,), custom_transport=transport)
    log = []
    handle = engine.DispatchHandle("hd2", 2, 4)
    assert engine._run_pipeline([_program(peers, log, c) for c in range(2)], handle) == [0, 1]
    assert sorted(posted) == posted_expected
    assert peak[0] == (1 if isinstance(transport, _OneAtATime) else 2)
    assert sorted(log) == [(0, 0), (0, 1), (1, 0), (1, 1)]
