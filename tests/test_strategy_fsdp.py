"""HierMoEStrategy(dense_sharding="fsdp"): the dense part sharded with FSDP2 over all ranks, the experts expert-
parallel. 4 ranks train exactly like one process (AdamW, SGD, clipping by the global norm), each rank holds a quarter
of the dense parameters, and checkpoints stay portable: a full one loads into a plain model and resumes under DDP,
under FSDP with replicas, and a sharded (DCP) one too."""

import json

import pytest
import torch

from hiermoe_lightning import HierMoEStrategy
from hiermoe_lightning.models import MoEGPT
from tests.lightning_harness import MODEL, fit
from tests.test_strategy import _validate

TOL = dict(atol=2e-5, rtol=2e-5)
FSDP = dict(dense_sharding="fsdp")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ref"))
    return {"adamw": fit(tmp, 1, max_epochs=2, tag="adamw")[0],
            "sgd": fit(tmp, 1, max_epochs=2, optimizer="sgd", tag="sgd")[0],
            "clip": fit(tmp, 1, max_epochs=2, clip=0.3, tag="clip")[0]}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fsdp_dense_with_ep4_trains_like_one_process(tmp_path, reference, optimizer):
    losses, parent = fit(str(tmp_path), 4, topology="2x2", dispatch="auto", max_epochs=2, optimizer=optimizer,
                         tag="fsdp", check_replicas=True, strategy_kwargs=FSDP)
    assert len(losses) == 10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[optimizer]), **TOL)
    verdict = json.load(open(tmp_path / "fsdp.replicas.json"))
    assert verdict["dense_identical"]
    # sharded: no rank holds more than its quarter of the dense parameters (plus FSDP's rounding per tensor)
    assert verdict["dense_numel_held_per_rank_max"] <= verdict["dense_numel"] / 4 * 1.1
    # the parent gets the plain, unsharded trained model
    assert all(type(p) is torch.nn.Parameter for p in parent.parameters())


def test_clipping_and_full_checkpoint_resume_under_ddp_and_fsdp_with_replicas(tmp_path, reference):
    ckpt = str(tmp_path / "epoch1.ckpt")
    first, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="auto", max_epochs=1, clip=0.3, save_path=ckpt,
                   tag="first", strategy_kwargs=FSDP)
    state = torch.load(ckpt, weights_only=True)
    plain = MoEGPT(**MODEL)
    plain.load_state_dict(state["state_dict"], strict=True)  # portable: the unsharded model's keys and shapes
    assert all(type(t) is torch.Tensor for t in state["state_dict"].values())
    for tag, world, kwargs, topology in [("ddp2", 2, {}, "2"), ("ep2x2", 4, {**FSDP, "expert_parallel_size": 2}, "2")]:
        second, _ = fit(str(tmp_path), world, topology=topology, dispatch="hd1", max_epochs=2, clip=0.3,
                        ckpt_path=ckpt, tag=tag, strategy_kwargs=kwargs)
        torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference["clip"]), **TOL,
                                   msg=lambda m: f"resumed as {tag}: {m}")


def test_sharded_checkpoint_resumes_from_ddp_into_fsdp(tmp_path, reference):
    ckpt = str(tmp_path / "sharded")
    first, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, save_path=ckpt, tag="first",
                   checkpoint_format="sharded")
    second, _ = fit(str(tmp_path), 4, topology="2", dispatch="hd1", max_epochs=2, ckpt_path=ckpt, tag="second",
                    checkpoint_format="sharded", strategy_kwargs={**FSDP, "expert_parallel_size": 2})
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference["adamw"]), **TOL)


def test_validate_with_fsdp_equals_one_process(tmp_path):
    single = _validate(1, tmp_path)
    four = _validate(4, tmp_path, **FSDP)
    assert abs(four - single) < 1e-4 and four > 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dense_sharding": "zero3"}, ValueError, "dense_sharding must be 'ddp'"),
    ({"dense_sharding": "fsdp", "fsdp_reshard_after_forward": "yes"}, TypeError, "fsdp_reshard_after_forward"),
])
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        HierMoEStrategy(**kwargs)


def test_fsdp_with_overlapped_layers_and_shared_experts_trains_like_one_process(tmp_path):
    # the shared experts run inside the overlapped pipeline on aliases of their FSDP-gathered parameters; SGD and
    # clipping expose any gradient counted twice or scaled wrongly
    shared = {"num_shared_experts": 1}
    ref, _ = fit(str(tmp_path), 1, max_epochs=1, tag="ref", model_kwargs=shared, optimizer="sgd", clip=0.5)
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, tag="fsdp", model_kwargs=shared,
                    optimizer="sgd", clip=0.5, strategy_kwargs={**FSDP, "overlap_chunks": 2})
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), **TOL)
