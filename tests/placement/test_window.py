"""RoutingWindow: EMA weights, bounded capacity (oldest first), normalisation, loads and plain-tensor state."""

from __future__ import annotations

import io

import pytest
import torch

from hiermoe_lightning.placement.window import RoutingWindow


def _step(value: int, G: int = 2, T: int = 3, K: int = 2) -> torch.Tensor:
    ids = torch.full((G, T, K), value)
    ids[..., 1] = value + 1
    return ids


def test_decay_and_drop_oldest():
    w = RoutingWindow(capacity_tokens_per_rank=5, decay=0.5)
    assert w.empty and len(w) == 0 and w.world_size is None
    w.ingest(_step(0))
    assert w.world_size == 2
    w.ingest(_step(2))
    ids, weights = w.trace(normalize=False)
    assert ids.shape == (2, 5, 2) and weights.shape == (2, 5)
    # 6 tokens per rank > 5: the oldest one is gone
    assert ids[0, :, 0].tolist() == [0, 0, 2, 2, 2]
    assert weights[0].tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]
    w.ingest(_step(4))
    ids, weights = w.trace(normalize=False)
    assert ids[1, :, 0].tolist() == [2, 2, 4, 4, 4]
    assert weights[1].tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]
    assert w.steps == 3 and len(w) == 5


def test_normalized_weights_sum_to_one_step():
    w = RoutingWindow(capacity_tokens_per_rank=100, decay=0.9)
    for v in range(4):
        w.ingest(_step(v, T=10))
    _, raw = w.trace(normalize=False)
    _, norm = w.trace()
    assert raw[0, -1] == 1.0 and raw[0, 0] == pytest.approx(0.9 ** 3)
    assert norm.sum(dim=1).tolist() == pytest.approx([10.0, 10.0])
    assert torch.allclose(norm / raw, norm[0, 0] / raw[0, 0] * torch.ones_like(raw))


def test_oversized_step_keeps_an_even_subset_with_its_weight():
    w = RoutingWindow(capacity_tokens_per_rank=4, decay=0.9)
    ids = torch.arange(8).reshape(1, 8, 1)
    w.ingest(ids)
    got, weights = w.trace(normalize=False)
    assert got[0, :, 0].tolist() == [0, 2, 4, 6]
    assert weights[0].tolist() == [2.0] * 4


def test_expert_load():
    w = RoutingWindow(capacity_tokens_per_rank=10, decay=0.5, num_experts=6)
    w.ingest(torch.tensor([[[0, 1], [1, -1]]]))
    w.ingest(torch.tensor([[[2, 1], [2, 3]]]))
    raw = w.expert_load(normalize=False)
    assert raw.tolist() == [0.5, 2.0, 2.0, 1.0, 0.0, 0.0]
    assert w.expert_load().sum() == pytest.approx(raw.sum() * 2 / 3)  # weights sum to 2 tokens (one step)
    assert RoutingWindow(num_experts=4).expert_load().tolist() == [0.0] * 4


def test_state_dict_round_trip_with_weights_only():
    w = RoutingWindow(capacity_tokens_per_rank=7, decay=0.8, num_experts=8)
    for v in range(3):
        w.ingest(_step(v, G=2, T=3))
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = RoutingWindow()
    other.load_state_dict(state)
    assert other.capacity_tokens_per_rank == 7 and other.decay == pytest.approx(0.8) and other.num_experts == 8
    for a, b in zip(w.trace(), other.trace()):
        assert torch.equal(a, b)
    assert other.steps == 3
    # an empty window round-trips too
    empty = RoutingWindow()
    fresh = RoutingWindow()
    fresh.load_state_dict(empty.state_dict())
    assert fresh.empty


def test_deterministic():
    a, b = RoutingWindow(5, 0.7), RoutingWindow(5, 0.7)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        step = torch.randint(0, 8, (2, 3, 2), generator=gen)
        a.ingest(step)
        b.ingest(step.clone())
    for x, y in zip(a.trace(), b.trace()):
        assert torch.equal(x, y)


def test_errors():
    with pytest.raises(ValueError, match="decay"):
        RoutingWindow(decay=0.0)
    with pytest.raises(ValueError, match="capacity"):
        RoutingWindow(capacity_tokens_per_rank=0)
    w = RoutingWindow()
    with pytest.raises(ValueError, match="empty"):
        w.trace()
    with pytest.raises(TypeError):
        w.ingest(torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="shape"):
        w.ingest(torch.zeros(2, 3, dtype=torch.long))
    w.ingest(torch.zeros(2, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="match"):
        w.ingest(torch.zeros(4, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="-1"):
        w.ingest(torch.full((2, 3, 2), -2))
    with pytest.raises(ValueError, match="num_experts"):
        RoutingWindow(num_experts=2).ingest(torch.full((1, 1, 1), 2))
