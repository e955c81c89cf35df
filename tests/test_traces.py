"""Generated routings (uniform, zipf:S), trace files (.pt, .npy) and the --routing parser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hiermoe_lightning.traces import RoutingSpec, generate_routing, load_trace, parse_routing


def test_parse_routing_forms():
    assert parse_routing("uniform") == RoutingSpec("uniform")
    assert parse_routing("zipf:1.2") == RoutingSpec("zipf", exponent=1.2)
    assert parse_routing("zipf:0") == RoutingSpec("zipf", exponent=0.0)
    assert parse_routing("trace:/tmp/x.pt") == RoutingSpec("trace", path="/tmp/x.pt")
    assert str(parse_routing("zipf:1.5")) == "zipf:1.5"


@pytest.mark.parametrize("bad", ["", "uniformly", "zipf", "zipf:", "zipf:abc", "zipf:-1", "zipf:nan", "trace:", "gauss"])
def test_parse_routing_errors_list_allowed_forms(bad):
    with pytest.raises(ValueError, match=r"uniform.*zipf:S.*trace:PATH"):
        parse_routing(bad)


def test_parse_routing_type_error():
    with pytest.raises(TypeError, match="routing"):
        parse_routing(3)


def _distinct_per_token(ids: torch.Tensor) -> bool:
    s = ids.sort(dim=-1).values
    return bool((s[..., 1:] != s[..., :-1]).all())


def test_uniform_shape_range_distinct_and_deterministic():
    ids = generate_routing("uniform", 4, 3000, 16, 4, seed=3)
    assert ids.shape == (4, 3000, 4) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    assert _distinct_per_token(ids)
    assert torch.equal(ids, generate_routing("uniform", 4, 3000, 16, 4, seed=3))
    assert not torch.equal(ids, generate_routing("uniform", 4, 3000, 16, 4, seed=4))
    counts = torch.bincount(ids.flatten(), minlength=16).double()
    mean = ids.numel() / 16  # 3000 each
    assert ((counts - mean).abs() / mean).max() < 0.06
    assert generate_routing("uniform", 1, 5, 4, 4, seed=0).sort(dim=-1).values.eq(torch.arange(4)).all()


def test_zipf_follows_the_contract_draw():
    E, K, G, T, S, seed = 12, 3, 2, 50, 1.3, 7
    ids = generate_routing(f"zipf:{S}", G, T, E, K, seed=seed)
    weights = 1.0 / (torch.arange(E, dtype=torch.float32) + 1) ** S
    gen = torch.Generator().manual_seed(seed)
    want = torch.multinomial(weights.expand(G * T, E), K, replacement=False, generator=gen)
    assert torch.equal(ids, want.reshape(G, T, K))


def test_zipf_popularity_order():
    ids = generate_routing("zipf:1.2", 2, 4000, 16, 2, seed=0)
    assert _distinct_per_token(ids)
    counts = torch.bincount(ids.flatten(), minlength=16)
    assert int(counts.argmax()) == 0
    assert counts[0] > counts[3] > counts[15]


@pytest.mark.parametrize(
    "args,match",
    [(("uniform", 0, 4, 8, 2), "world_size"), (("uniform", 2, 4, 8, 9), "top_k"), (("uniform", 2, 4, 8, 0), "top_k"),
     (("trace:x.pt", 2, 4, 8, 2), "load_trace")],
)
def test_generate_errors(args, match):
    with pytest.raises(ValueError, match=match):
        generate_routing(*args)


def test_load_pt_and_npy(tmp_path):
    ids = torch.tensor([[[0, 3], [1, 2]], [[2, -1], [3, 0]]])
    torch.save(ids, tmp_path / "t.pt")
    np.save(tmp_path / "t.npy", ids.numpy().astype(np.int32))
    for name in ("t.pt", "t.npy"):
        got = load_trace(tmp_path / name, num_experts=4)
        assert got.dtype == torch.long and torch.equal(got, ids)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="nope.pt.*does not exist"):
        load_trace(missing)
    cases = {
        "float.pt": (torch.zeros(2, 2, 2), "integer"),
        "flat.pt": (torch.zeros(4, 2, dtype=torch.long), "3-D"),
        "range.pt": (torch.full((2, 2, 2), 9), "out of range"),
        "neg.pt": (torch.full((2, 2, 2), -2), "out of range"),
        "twice.pt": (torch.tensor([[[1, 1]]]), "twice"),
    }
    for name, (tensor, match) in cases.items():
        torch.save(tensor, tmp_path / name)
        with pytest.raises(ValueError, match=match) as err:
            load_trace(tmp_path / name, num_experts=8)
        assert name in str(err.value)
    np.save(tmp_path / "float.npy", np.zeros((2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="float.npy.*integer"):
        load_trace(tmp_path / "float.npy")
    torch.save({"ids": torch.zeros(1, 1, 1, dtype=torch.long)}, tmp_path / "dict.pt")
    with pytest.raises((ValueError, TypeError), match="dict.pt"):
        load_trace(tmp_path / "dict.pt")
    (tmp_path / "t.csv").write_text("0,1\n")
    with pytest.raises(ValueError, match=r"t.csv.*\.pt.*\.npy"):
        load_trace(tmp_path / "t.csv")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pt"):
        load_trace(tmp_path / "junk.pt")
