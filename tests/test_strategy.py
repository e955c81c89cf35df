"""HierMoEStrategy: N ranks train exactly like one process on the same global batch; checkpoints are portable."""

import datetime
import importlib
import json
import os

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import hiermoe_lightning
from hiermoe_lightning import HierMoEStrategy
from hiermoe_lightning.models import MoEGPT
from tests.lightning_harness import MODEL, fit

TOL = dict(atol=2e-5, rtol=2e-5)


def test_registry_resolves_and_reimport_is_idempotent():
    assert "hiermoe" in StrategyRegistry
    importlib.reload(hiermoe_lightning)  # a second import must not raise
    assert "hiermoe" in StrategyRegistry
    import lightning.pytorch as pl

    trainer = pl.Trainer(strategy="hiermoe", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, HierMoEStrategy)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Single-process runs: 2 epochs x 5 steps each, AdamW and SGD, plain / clipped / accumulated."""
    tmp = str(tmp_path_factory.mktemp("ref"))
    return {
        "adamw": fit(tmp, 1, max_epochs=2, tag="adamw")[0],
        "sgd": fit(tmp, 1, max_epochs=2, optimizer="sgd", tag="sgd")[0],
        "clip": fit(tmp, 1, max_epochs=2, clip=0.3, tag="clip")[0],
        "accum": fit(tmp, 1, max_epochs=2, accumulate=2, tag="accum")[0],
    }


@pytest.mark.parametrize("dispatch, chunks, shared_memory",
                         [("flat", 1, True), ("hd2", 1, True), ("auto", 1, True), ("hd2", 3, True), ("hd2", 3, False)])
def test_four_ranks_equal_one_process_adamw(tmp_path, reference_runs, dispatch, chunks, shared_memory):
    losses, parent_model = fit(str(tmp_path), 4, topology="2x2", dispatch=dispatch, max_epochs=2, tag=dispatch,
                               check_replicas=True, pipeline_chunks=chunks, shared_memory=shared_memory)
    assert len(losses) == 10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_runs["adamw"]), **TOL)
    replicas = json.load(open(tmp_path / f"{dispatch}.replicas.json"))
    assert replicas["dense_identical"]
    assert replicas["expert_numel_per_rank"] == 2 * 2 * 3 * 32 * 32  # 2 layers x 2 experts x 3 matrices


def test_sgd_exposes_gradient_scale(tmp_path, reference_runs):
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, optimizer="sgd", tag="sgd")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_runs["sgd"]), **TOL)


def test_clipping_uses_the_global_norm(tmp_path, reference_runs):
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, clip=0.3, tag="clip",
                    check_replicas=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_runs["clip"]), **TOL)
    assert json.load(open(tmp_path / "clip.replicas.json"))["dense_identical"]
    assert reference_runs["clip"] != reference_runs["adamw"]  # clipping was active


def test_gradient_accumulation(tmp_path, reference_runs):
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, accumulate=2, tag="accum")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_runs["accum"]), **TOL)


@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_parent_gets_the_unsharded_trained_model(tmp_path, checkpoint_format):
    _, single = fit(str(tmp_path), 1, max_epochs=1, tag="single")
    _, parent = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, tag="four",
                    checkpoint_format=checkpoint_format)
    ref = single.state_dict()
    for name, t in parent.state_dict().items():
        torch.testing.assert_close(t, ref[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("resume_world", [4, 2])
def test_resume_from_full_checkpoint_continues_exactly(tmp_path, reference_runs, resume_world):
    ckpt = str(tmp_path / "epoch1.ckpt")
    first, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, save_path=ckpt, tag="first")
    topo = "2x2" if resume_world == 4 else "2x1"
    second, _ = fit(str(tmp_path), resume_world, topology=topo, dispatch="hd2", max_epochs=2, ckpt_path=ckpt,
                    tag="second")
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference_runs["adamw"]), **TOL)


def test_full_checkpoint_loads_into_plain_single_process_model(tmp_path):
    ckpt = str(tmp_path / "c.ckpt")
    fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, save_path=ckpt, tag="a")
    _, single = fit(str(tmp_path), 1, max_epochs=1, tag="b")
    state = torch.load(ckpt, weights_only=True)
    plain = MoEGPT(**MODEL)
    plain.load_state_dict(state["state_dict"], strict=True)
    x = torch.randint(0, 256, (2, MODEL["seq_len"]))
    torch.testing.assert_close(plain(x), single(x), **TOL)
    placements = state["hiermoe"]["placements"]
    assert len(placements) == MODEL["num_layers"] and all(p["world_size"] == 4 for p in placements.values())


def test_checkpoint_with_other_expert_count_fails_clearly(tmp_path):
    ckpt = str(tmp_path / "c.ckpt")
    fit(str(tmp_path), 4, topology="2x2", dispatch="flat", max_epochs=1, save_path=ckpt, tag="a")
    with pytest.raises(Exception, match="num_experts"):
        fit(str(tmp_path), 4, topology="2x2", dispatch="flat", max_epochs=2, ckpt_path=ckpt, tag="b",
            model_kwargs={"num_experts": 16})


@pytest.mark.parametrize("kwargs, match", [
    ({"topology": "2x3"}, "world size 6"),
    ({"model_kwargs": {"num_experts": 6}}, "divisible"),
])
def test_bad_config_fails_before_any_collective(tmp_path, kwargs, match):
    topology = kwargs.get("topology", "2x2")
    with pytest.raises(Exception, match=match):
        fit(str(tmp_path), 4, topology=topology, dispatch="flat", tag="bad", model_kwargs=kwargs.get("model_kwargs"))


def test_bad_strategy_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="hd9"):
        HierMoEStrategy(topology="2x2", dispatch="hd9")
    with pytest.raises(ValueError, match="paper-a6000"):
        HierMoEStrategy(link_costs="nope")
    with pytest.raises(ValueError, match="'2x'"):
        HierMoEStrategy(topology="2x")
    with pytest.raises(ValueError, match="pipeline_chunks"):
        HierMoEStrategy(topology="2x2", pipeline_chunks=0)
    with pytest.raises(ValueError, match="shared_memory must be True or False"):
        HierMoEStrategy(topology="2x2", shared_memory=1)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"timeout": -1}, ValueError, "timeout must be a finite number of seconds > 0, got -1"),
    ({"timeout": 0}, ValueError, "timeout must be"),
    ({"timeout": float("nan")}, ValueError, "timeout must be"),
    ({"timeout": datetime.timedelta(seconds=-5)}, ValueError, "timeout must be"),
    ({"timeout": "60"}, TypeError, "timeout must be a number of seconds > 0 or a datetime.timedelta"),
    ({"timeout": True}, TypeError, "timeout must be"),
    ({"check_finite": "yes"}, ValueError, "check_finite must be True or False"),
    ({"verify_splits": 1}, ValueError, "verify_splits must be True or False"),
    ({"find_unused_parameters": None}, ValueError, "find_unused_parameters must be True or False"),
    ({"process_group_backend": "tcp"}, ValueError, "process_group_backend must be None"),
    ({"checkpoint_format": "zip"}, ValueError, "checkpoint_format must be 'full' or 'sharded'"),
    ({"auto_interval": 0}, ValueError, "auto_interval"),
    ({"start_method": "thread"}, ValueError, "start_method must be one of"),
])
def test_every_strategy_argument_is_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        HierMoEStrategy(topology="2x2", **kwargs)


def test_valid_timeouts_become_timedeltas():
    assert HierMoEStrategy(timeout=90)._timeout == datetime.timedelta(seconds=90)
    assert HierMoEStrategy(timeout=datetime.timedelta(minutes=2))._timeout == datetime.timedelta(seconds=120)


@pytest.mark.parametrize("resume_world", [4, 2])
def test_resume_from_sharded_checkpoint_continues_exactly(tmp_path, reference_runs, resume_world):
    ckpt = str(tmp_path / "epoch1.dcp")
    first, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=1, save_path=ckpt, tag="first",
                   checkpoint_format="sharded")
    files = os.listdir(ckpt)
    assert "hiermoe_meta.pt" in files and sum(f.endswith(".distcp") for f in files) == 4  # one shard per rank
    topo = "2x2" if resume_world == 4 else "2x1"
    second, _ = fit(str(tmp_path), resume_world, topology=topo, dispatch="hd2", max_epochs=2, ckpt_path=ckpt,
                    tag="second", checkpoint_format="sharded")
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference_runs["adamw"]), **TOL)


class _Val(torch.utils.data.Dataset):
    def __init__(self):
        from hiermoe_lightning.data import ByteTextDataModule

        self.base = ByteTextDataModule(seq_len=MODEL["seq_len"], batch_size=1).val_dataset

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return self.base[i]


def _validate(world, tmp_path, **strategy_kwargs):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler

    class Module(MoEGPT):
        def val_dataloader(self):
            ds = _Val()
            if world == 1:
                return DataLoader(ds, batch_size=8)
            import torch.distributed as dist

            return DataLoader(ds, batch_size=8 // world,
                              sampler=DistributedSampler(ds, num_replicas=world, rank=dist.get_rank(), shuffle=False))

    model = Module(**MODEL)
    strategy = "auto" if world == 1 else HierMoEStrategy(topology="2x2", dispatch="hd2", start_method="fork", timeout=60,
                                                         **strategy_kwargs)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path))
    return trainer.validate(model, verbose=False)[0]["val/loss"]


def test_validate_on_four_ranks_equals_one_process(tmp_path):
    # val/loss is logged with sync_dist (averaged over ranks); sharded experts must give the single-process value
    single = _validate(1, tmp_path)
    four = _validate(4, tmp_path)
    assert abs(four - single) < 1e-4 and four > 0  # equal-size batches: the mean of rank means is the mean


def test_overlapped_layers_train_like_one_process(tmp_path, reference_runs):
    # dispatch, experts and combine as one pipeline of 3 chunks (forward and backward), hd2 on 2x2
    losses, _ = fit(str(tmp_path), 4, topology="2x2", dispatch="hd2", max_epochs=2, tag="overlap",
                    check_replicas=True, strategy_kwargs={"overlap_chunks": 3})
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_runs["adamw"]), **TOL)
    assert json.load(open(tmp_path / "overlap.replicas.json"))["dense_identical"]
