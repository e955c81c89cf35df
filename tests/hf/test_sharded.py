"""A converted HF model through the model seam: ExpertParallel shards its MoELayers like any other module's."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from hiermoe_lightning import ExpertParallel, hf  # noqa: E402
from hiermoe_lightning.testing import run_ranks  # noqa: E402
from tests.hf.tiny import SUPPORTED, build, token_ids  # noqa: E402

EXACT = dict(rtol=1e-5, atol=1e-5)


def _sharded_step(rank, world, model, ids):
    """This rank's half of the batch through the sharded model; its logits and its experts' gradients."""
    ExpertParallel("2", dispatch="hd1").shard_(model)
    try:
        hf.to_hf_state_dict(model)
        refused = ""
    except ValueError as e:
        refused = str(e)
    logits = model(ids[rank : rank + 1]).logits
    logits.square().sum().backward()
    moe = model.model.layers[0].mlp.moe
    return logits.detach(), moe.local_expert_ids(), moe.experts.w_down.grad, refused


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_sharded_converted_model_equals_unsharded(model_type):
    model = build(model_type)
    hf.convert_(model)
    ids = token_ids(batch=2, seq=10)
    results = run_ranks(_sharded_step, 2, model, ids, timeout=120)  # forked: each rank shards its own copy
    logits = model(ids).logits
    logits.square().sum().backward()
    torch.testing.assert_close(torch.cat([r[0] for r in results]), logits.detach(), **EXACT)
    full_grad = model.model.layers[0].mlp.moe.experts.w_down.grad
    for _, experts, grad, refused in results:
        assert len(experts) == model.model.layers[0].mlp.moe.num_experts // 2
        torch.testing.assert_close(grad, full_grad[experts], **EXACT)  # each expert sees both ranks' tokens
        assert "needs an unsharded model" in refused
