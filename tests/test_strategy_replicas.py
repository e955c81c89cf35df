"""HierMoEStrategy(expert_parallel_size=...): expert parallelism inside data parallelism. 4 ranks as 2 replicas of 2
train exactly like one process (AdamW and SGD, with swaps, flat and hierarchical), every copy of an expert stays
identical, checkpoints hold each expert once and resume on another expert-parallel size or world size."""

import glob
import json

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger

from hiermoe_lightning import HierMoECallback, HierMoEStrategy
from hiermoe_lightning.replicas import ReplicaLayout
from hiermoe_lightning.testing import run_ranks
from tests.lightning_harness import fit
from tests.test_callback import COSTS, PLAN_KWARGS

TOL = dict(atol=2e-5, rtol=2e-5)
EP2 = dict(expert_parallel_size=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ref"))
    return {opt: fit(tmp, 1, max_epochs=2, optimizer=opt, tag=opt)[0] for opt in ("adamw", "sgd")}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("topology, dispatch, swaps", [("2", "hd1", True), ("1x2", "flat", False)])
def test_two_replicas_of_two_train_like_one_process(tmp_path, reference, optimizer, topology, dispatch, swaps):
    logger = CSVLogger(str(tmp_path), name="csv") if swaps else False
    callbacks = [HierMoECallback(**PLAN_KWARGS, print_summary=False)] if swaps else []
    losses, _ = fit(str(tmp_path), 4, topology=topology, dispatch=dispatch, max_epochs=2, optimizer=optimizer,
                    tag="ep", check_replicas=True, extra_callbacks=callbacks, link_costs=COSTS, logger=logger,
                    strategy_kwargs=EP2)
    assert len(losses) == 10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[optimizer]), **TOL)
    verdict = json.load(open(tmp_path / "ep.replicas.json"))
    assert verdict["dense_identical"] and verdict["experts_identical_across_replicas"]
    assert verdict["expert_numel_per_rank"] == 2 * 4 * 3 * 32 * 32  # 2 layers x 8 / 2 experts x 3 matrices
    if swaps:
        history = json.load(open(glob.glob(str(tmp_path / "csv" / "*" / "hiermoe_placement_history.json"))[0]))
        assert history["swaps_total"] > 0, "the planner found nothing to swap: the test would prove nothing"


@pytest.mark.parametrize("resume_world, resume_kwargs, topology", [(4, {}, "2x2"), (2, {}, "2")])
def test_resume_on_another_expert_parallel_size(tmp_path, reference, resume_world, resume_kwargs, topology):
    ckpt = str(tmp_path / "epoch1.ckpt")
    first, _ = fit(str(tmp_path), 4, topology="2", dispatch="hd1", max_epochs=1, save_path=ckpt, tag="first",
                   extra_callbacks=[HierMoECallback(**PLAN_KWARGS, print_summary=False)], link_costs=COSTS,
                   strategy_kwargs=EP2)
    state = torch.load(ckpt, weights_only=True)
    assert state["hiermoe"]["expert_parallel_size"] == 2
    assert all(p["world_size"] == 2 for p in state["hiermoe"]["placements"].values())
    second, _ = fit(str(tmp_path), resume_world, topology=topology, dispatch="hd2" if "x" in topology else "flat",
                    max_epochs=2, ckpt_path=ckpt, tag="second", strategy_kwargs=resume_kwargs)
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference["adamw"]), **TOL)


def test_sharded_checkpoint_writes_each_expert_once_and_resumes_on_ep4(tmp_path, reference):
    import torch.distributed.checkpoint as dcp

    ckpt = str(tmp_path / "sharded")
    first, _ = fit(str(tmp_path), 4, topology="2", dispatch="hd1", max_epochs=1, save_path=ckpt, tag="first",
                   checkpoint_format="sharded", strategy_kwargs=EP2)
    metadata = dcp.FileSystemReader(ckpt).read_metadata()
    keys = [k for k in metadata.state_dict_metadata if "/expert" in k]
    assert len(keys) == len(set(keys)) and any(k.endswith("/expert7") for k in keys)
    # every expert's tensors were written by one rank only: the storage holds each once
    writers = {k.fqn for k in metadata.storage_data if "/expert" in k.fqn}
    assert writers == set(keys)
    files = {metadata.storage_data[k].relative_path for k in metadata.storage_data if "/expert" in k.fqn}
    assert len(files) <= 2, f"experts were written by more than one replica: {sorted(files)}"
    second, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, ckpt_path=ckpt, tag="second",
                    checkpoint_format="sharded")
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference["adamw"]), **TOL)


def test_size_that_does_not_divide_the_world_fails_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"expert_parallel_size=3 must divide the world size \(4 ranks\)"):
        fit(str(tmp_path), 4, dispatch="hd1", max_epochs=1, tag="bad", strategy_kwargs={"expert_parallel_size": 3})


def _check_on_every_rank(rank, world):
    try:
        ReplicaLayout.resolve(3, dist.get_world_size())
        verdict = "passed"
    except ValueError as e:
        verdict = str(e)
    dist.barrier()  # every rank got here: none is left waiting in a collective
    return verdict


def test_the_check_fails_identically_on_every_rank_before_any_collective():
    verdicts = run_ranks(_check_on_every_rank, 4)
    assert len(set(verdicts)) == 1 and "expert_parallel_size=3 must divide" in verdicts[0]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"expert_parallel_size": 0}, ValueError, "expert_parallel_size must be None"),
    ({"expert_parallel_size": "2"}, TypeError, "expert_parallel_size must be None"),
    ({"expert_parallel_size": 2, "topology": "2x2"}, ValueError, "topology 2x2 describes one replica of 4 ranks"),
])
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        HierMoEStrategy(**kwargs)


def test_topology_defaults_to_one_replica():
    assert str(HierMoEStrategy(expert_parallel_size=2, parallel_devices=[torch.device("cpu")] * 2).topology) == "1x2"
    assert str(HierMoEStrategy(expert_parallel_size=2, parallel_devices=[torch.device("cpu")] * 4).topology) == "2"


def test_gpu_process_group_carries_cpu_tensors_too():
    # the host-side gathers (auto, swap plans, the copies' presence flags) hold CPU tensors: NCCL alone would refuse
    strategy = HierMoEStrategy(expert_parallel_size=2, process_group_backend="nccl")
    assert strategy._get_process_group_backend() == "cpu:gloo,cuda:nccl"
    assert HierMoEStrategy(process_group_backend="gloo")._get_process_group_backend() == "gloo"
