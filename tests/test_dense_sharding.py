"""dense_sharding: which modules become FSDP units, and the full <-> sharded conversions checkpoints rely on (real
gloo ranks, compared with the plain tensors of one process)."""

import pytest
import torch
from torch import nn

from hiermoe_lightning import MoELayer
from hiermoe_lightning.dense_sharding import (check_dense_sharding, distribute_like, empty_like_sharded, fsdp_units,
                                              full_tensor, is_sharded_tensor, local_tensor, shard_dense_)
from hiermoe_lightning.testing import run_ranks


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.moe = MoELayer(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=2)

    def forward(self, x):
        return self.moe(self.attn(x))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList([_Block(), _Block(), nn.ReLU()])
        self.head = nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x @ self.head.t()


def test_units_are_the_blocks_with_parameters_never_moe_layers():
    torch.manual_seed(0)
    model = _Model()
    assert [name for name, _ in fsdp_units(model, skip=(MoELayer,))] == ["blocks.0", "blocks.1"]
    # a model whose only ModuleList lives inside MoE layers has no unit but its root
    layer = MoELayer(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=2)
    assert fsdp_units(nn.Sequential(layer), skip=(MoELayer,)) == []


@pytest.mark.parametrize("value", ["FSDP", "zero3", None, 1])
def test_bad_dense_sharding_names_the_parameter_and_the_choices(value):
    with pytest.raises(ValueError, match=r"dense_sharding must be 'ddp' .* or 'fsdp'"):
        check_dense_sharding(value)


def _shard_and_convert(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)  # the same model on every rank
    model = _Model()
    reference = {n: t.detach().clone() for n, t in model.state_dict().items()}
    x = torch.randn(5, 3)
    expected = model(x).detach()
    experts = [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.slot_parameters()]
    mesh = init_device_mesh("cpu", (world,))
    units = shard_dense_(model, mesh, experts, skip=(MoELayer,))
    plain = [n for n, p in model.named_parameters() if not is_sharded_tensor(p)]
    held = sum(local_tensor(p).numel() for n, p in model.named_parameters() if is_sharded_tensor(p))
    output_ok = torch.allclose(model(x), expected, atol=1e-6)
    state = model.state_dict()  # sharded values, also while the root keeps its parameters gathered after a forward
    sharded = sorted(n for n, t in state.items() if is_sharded_tensor(t))
    full = {n: full_tensor(t) for n, t in state.items()}  # collective, same order everywhere
    same = all(torch.equal(full[n], reference[n]) for n in reference)
    back = {n: distribute_like(full[n], state[n]) for n in full}
    roundtrip = all(torch.equal(local_tensor(back[n]), local_tensor(state[n])) for n in state)
    template = empty_like_sharded(list(state["embed.weight"].shape), torch.float32, state["embed.weight"])
    return units, sharded, held, same, roundtrip, output_ok, is_sharded_tensor(template), plain


def test_shard_dense_keeps_the_function_and_the_values():
    out = run_ranks(_shard_and_convert, 2)
    dense = 2 * (16 + 4) + 2 * (4 * 4) + (12 + 4) + 8  # attn + routers (4 experts x 4) + embed + head
    for units, sharded, held, same, roundtrip, output_ok, template_sharded, plain in out:
        assert units == ["blocks.0", "blocks.1", ""]
        assert same and roundtrip and output_ok and template_sharded
        assert all("experts.w_" in n for n in plain) and len(plain) == 6  # the experts stay plain, unsharded
        assert "head" in sharded and "blocks.1.attn.weight" in sharded
    assert sum(o[2] for o in out) == dense  # every dense value held once across the ranks
