"""Clustered router init (models/clustered_routing.py) and MoEGPT(router_clusters=...): determinism, interleaved
clusters, the share measure against its chance level, argument errors, the meta build, sharded layers."""

import math

import pytest
import torch

from hiermoe_lightning.layer import MoELayer
from hiermoe_lightning.models import MoEGPT
from hiermoe_lightning.models.clustered_routing import (
    DEFAULT_STRENGTH, ClusteredMoELayer, chance_within_cluster_share, cluster_directions, cluster_of_expert,
    cluster_router_weights, cluster_routers_, layer_cluster_seed, within_cluster_share,
)

# one intra-op thread per test: tests/conftest.py


def _top_k(weight: torch.Tensor, k: int, tokens: int = 2000, seed: int = 0) -> torch.Tensor:
    """``[T, K]`` top-k of isotropic tokens (the scale of RMS-normalised hidden states) under the gate ``weight``."""
    x = torch.randn(tokens, weight.shape[1], generator=torch.Generator().manual_seed(seed))
    return (x @ weight.t()).topk(k, dim=-1).indices


# ---------------------------------------------------------------------------------------------- the weights
def test_same_seed_same_weights_without_touching_the_global_rng():
    rng = torch.get_rng_state()
    a = cluster_router_weights(16, 64, 4, 2.0, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.shape == (16, 64) and a.dtype == torch.float32
    assert torch.equal(a, cluster_router_weights(16, 64, 4, 2.0, seed=5))
    assert not torch.equal(a, cluster_router_weights(16, 64, 4, 2.0, seed=6))
    assert cluster_router_weights(16, 64, 4, 2.0, seed=5, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_clusters_are_interleaved_and_share_one_orthonormal_direction():
    assert cluster_of_expert(8, 2).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert cluster_of_expert(8, 4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    u = cluster_directions(32, 4, seed=1)  # [C, M]
    torch.testing.assert_close(u @ u.t(), torch.eye(4), atol=1e-5, rtol=0)
    w = cluster_router_weights(8, 32, 4, 100.0, seed=2)  # the cluster term dominates: rows ~ 100 * u_{e % 4}
    cos = torch.nn.functional.normalize(w, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    same = cluster_of_expert(8, 4)[:, None] == cluster_of_expert(8, 4)[None, :]
    assert cos[same].min() > 0.99 and cos[~same].abs().max() < 0.05
    # strength 0: just the N(0, 1/M) noise (row norm about 1)
    assert cluster_router_weights(16, 256, 2, 0.0, seed=3).norm(dim=1).mean() == pytest.approx(1.0, abs=0.1)


def test_within_cluster_share_is_chance_at_strength_0_and_high_when_strong():
    for k, clusters in ((8, 2), (4, 4)):
        chance = chance_within_cluster_share(16, k, clusters)
        weak = within_cluster_share(_top_k(cluster_router_weights(16, 64, clusters, 0.0, seed=0), k), clusters)
        strong = within_cluster_share(_top_k(cluster_router_weights(16, 64, clusters, 8.0, seed=0), k), clusters)
        assert abs(weak - chance) < 0.05, (k, clusters, weak, chance)
        assert strong > 0.9 and strong > chance + 0.3, (k, clusters, strong)


def test_within_cluster_share_counts_and_chance_level():
    ids = torch.tensor([[0, 2, 4, 1], [1, 3, 0, 2]])  # 2 clusters (even / odd): 3 of 4, then 2 of 4
    assert within_cluster_share(ids, 2) == pytest.approx(5 / 8)
    assert within_cluster_share(torch.tensor([[0, 2, -1, -1], [1, 0, 3, -1]]), 2) == pytest.approx(4 / 5)  # drops
    assert within_cluster_share(ids, 1) == 1.0
    # E=16, K=8, C=2: E[max(X, 8-X)] / 8 with X ~ Hypergeometric(16, 8, 8)
    want = sum(math.comb(8, x) * math.comb(8, 8 - x) * max(x, 8 - x) for x in range(9)) / (math.comb(16, 8) * 8)
    assert chance_within_cluster_share(16, 8, 2) == pytest.approx(want)
    assert chance_within_cluster_share(16, 4, 16) == pytest.approx(0.25)  # every expert its own cluster
    assert chance_within_cluster_share(8, 3, 1) == 1.0
    uniform = torch.rand(20000, 16, generator=torch.Generator().manual_seed(0)).argsort(dim=1)[:, :4]
    assert within_cluster_share(uniform, 4) == pytest.approx(chance_within_cluster_share(16, 4, 4), abs=0.01)


@pytest.mark.parametrize("call, error, match", [
    (lambda: cluster_router_weights(16, 64, 3, 1.0, 0), ValueError, r"clusters must be a divisor of num_experts "
                                                                     r"\(16\).*one of 1, 2, 4, 8, 16; got 3"),
    (lambda: cluster_router_weights(16, 64, 0, 1.0, 0), ValueError, "clusters must be"),
    (lambda: cluster_router_weights(16, 4, 8, 1.0, 0), ValueError, r"<= hidden_size \(4\)"),
    (lambda: cluster_router_weights(16, 64, 2.0, 1.0, 0), TypeError, "clusters must be"),
    (lambda: cluster_router_weights(16, 64, 2, -1.0, 0), ValueError, r"strength must be a number in \[0, inf\)"),
    (lambda: cluster_router_weights(16, 64, 2, float("nan"), 0), ValueError, "strength"),
    (lambda: cluster_router_weights(16, 64, 2, 1.0, -1), ValueError, "seed must be an int >= 0"),
    (lambda: cluster_router_weights(16, 64, 2, 1.0, 0, dtype=torch.int32), TypeError, "dtype"),
    (lambda: within_cluster_share(torch.zeros(4), 2), ValueError, r"expert_ids must be an integer tensor"),
    (lambda: within_cluster_share(torch.full((2, 2), -1), 2), ValueError, "no routed pair"),
    (lambda: MoEGPT(router_clusters=3), ValueError, r"router_clusters must be 0 \(off\) or a divisor of num_experts "
                                                    r"\(8\).*one of 0, 1, 2, 4, 8; got 3"),
    (lambda: MoEGPT(router_clusters=-1), ValueError, "router_clusters"),
    (lambda: MoEGPT(router_clusters=2, router_cluster_strength=-0.5), ValueError, "router_cluster_strength"),
    (lambda: MoEGPT(router_clusters=True), TypeError, "router_clusters"),
])
def test_argument_errors_name_the_parameter_and_allowed_values(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------- applied to layers
def test_cluster_routers_rewrites_every_layer_with_its_own_seed():
    model = MoEGPT(seed=2, num_layers=3, dense_layers=1)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    names = cluster_routers_(model, 2, 3.0, seed=9)
    assert names == ["blocks.1.ffn", "blocks.2.ffn"]
    gates = [layer.router.weight for layer in model.moe_layers()]
    assert not torch.equal(gates[0], gates[1])  # each layer its own seed
    for i, gate in enumerate(gates):
        assert torch.equal(gate, cluster_router_weights(8, 64, 2, 3.0, layer_cluster_seed(9, i)))
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == {"blocks.1.ffn.router.weight", "blocks.2.ffn.router.weight"}  # only the gates


def test_cluster_routers_checks_everything_before_writing():
    with torch.device("meta"):
        meta = MoELayer(16, 8, 4, 2)
    with pytest.raises(ValueError, match="on the meta device.*materialise the layer first"):
        cluster_routers_(meta, 2, 1.0, 0)
    model = torch.nn.Sequential(MoELayer(16, 8, 4, 2, seed=1), MoELayer(16, 8, 6, 2, seed=2))
    before = model[0].router.weight.clone()
    with pytest.raises(ValueError, match=r"cluster_routers_ \(1\): clusters must be a divisor of num_experts \(6\)"):
        cluster_routers_(model, 4, 1.0, 0)
    assert torch.equal(model[0].router.weight, before)  # nothing written
    with pytest.raises(ValueError, match="has no MoELayer"):
        cluster_routers_(torch.nn.Linear(2, 2), 2, 1.0, 0)


def _sharded_gates(rank: int, world: int) -> dict:
    """On each rank: a meta-built clustered MoEGPT sharded by ExpertParallel (materialised there), and a plain MoEGPT
    sharded first, then clustered by cluster_routers_."""
    from hiermoe_lightning import ExpertParallel
    from hiermoe_lightning.strategy import materialize_dense_

    kwargs = dict(seed=1, router_clusters=2, router_cluster_strength=3.0)
    with torch.device("meta"):
        meta = MoEGPT(**kwargs)
    ExpertParallel(str(world)).shard_(meta, device="cpu")
    materialize_dense_(meta, "cpu")
    plain = MoEGPT(seed=1)
    ExpertParallel(str(world)).shard_(plain)
    cluster_routers_(plain, 2, 3.0, seed=1)
    return {"meta": [m.router.weight.clone() for m in meta.moe_layers()],
            "applied": [m.router.weight.clone() for m in plain.moe_layers()],
            "slots": [m.experts.num_slots for m in meta.moe_layers()]}


def test_sharded_layers_get_the_full_clustered_gate_on_every_rank():
    from hiermoe_lightning.testing import run_ranks

    want = [m.router.weight for m in MoEGPT(seed=1, router_clusters=2, router_cluster_strength=3.0).moe_layers()]
    for got in run_ranks(_sharded_gates, 2, timeout=60):
        assert got["slots"] == [4, 4]  # sharded: 8 experts over 2 ranks
        for key in ("meta", "applied"):
            assert len(got[key]) == len(want)
            for g, w in zip(got[key], want):
                assert torch.equal(g, w), key


def test_moegpt_router_clusters_is_cluster_routers_of_the_plain_model_and_in_hparams():
    clustered = MoEGPT(seed=3, num_layers=3, dense_layers=1, router_clusters=4, router_cluster_strength=2.5)
    plain = MoEGPT(seed=3, num_layers=3, dense_layers=1)
    cluster_routers_(plain, 4, 2.5, seed=3)
    for name, want in plain.state_dict().items():
        assert torch.equal(clustered.state_dict()[name], want), name
    assert all(type(m) is ClusteredMoELayer for m in clustered.moe_layers())
    assert all(type(m) is MoELayer for m in MoEGPT().moe_layers())  # 0: the usual layers, untouched
    assert clustered.hparams.router_clusters == 4 and clustered.hparams.router_cluster_strength == 2.5
    assert MoEGPT().hparams.router_clusters == 0 and MoEGPT().hparams.router_cluster_strength == DEFAULT_STRENGTH


def test_moegpt_built_on_meta_materialises_the_same_clustered_gates():
    from hiermoe_lightning.strategy import materialize_dense_

    kwargs = dict(seed=7, num_layers=3, dense_layers=1, router_clusters=2, router_cluster_strength=4.0)
    rng = torch.get_rng_state()
    with torch.device("meta"):
        meta = MoEGPT(**kwargs)
    assert all(t.is_meta for t in meta.parameters())
    for layer in meta.moe_layers():  # what the strategy does, in one process (tests/models/test_moe_gpt.py)
        layer.materialize_("cpu")
    materialize_dense_(meta, "cpu", seed=123)
    assert torch.equal(torch.get_rng_state(), rng)
    normal = MoEGPT(**kwargs).state_dict()
    got = meta.state_dict()
    assert list(got) == list(normal)
    for name, want in normal.items():
        assert torch.equal(got[name], want), name
    assert not torch.equal(got["blocks.1.ffn.router.weight"], MoEGPT(seed=7, num_layers=3, dense_layers=1)
                           .state_dict()["blocks.1.ffn.router.weight"])


def test_materialize_keeps_a_gate_that_has_storage():
    layer = ClusteredMoELayer(16, 8, 4, 2, router_clusters=2, router_cluster_strength=1.0, router_cluster_seed=0)
    with torch.no_grad():
        layer.router.weight.fill_(0.5)  # trained / loaded
    layer.materialize_("cpu")
    assert bool((layer.router.weight == 0.5).all())


def test_lightning_cli_yaml_sets_router_clusters(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "clustered.yaml"
    config.write_text("model:\n  class_path: hiermoe_lightning.models.MoEGPT\n  init_args:\n"
                      "    router_clusters: 2\n    router_cluster_strength: 3.0\n")
    monkeypatch.setattr("sys.argv", ["hiermoe"])  # LightningCLI warns when pytest's own argv is also present
    cli = LightningCLI(run=False, save_config_callback=None, seed_everything_default=False,
                       args=["--config", str(config), "--data=hiermoe_lightning.data.ByteTextDataModule",
                             "--trainer.logger=false", "--trainer.accelerator=cpu"])
    assert cli.model.hparams.router_clusters == 2 and cli.model.hparams.router_cluster_strength == 3.0
    assert all(isinstance(m, ClusteredMoELayer) for m in cli.model.moe_layers())
