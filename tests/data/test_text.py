"""ByteTextDataModule: windows are the corpus bytes shifted by one, splits, determinism, offline default, errors."""

import socket

import pytest
import torch

from hiermoe_lightning.data import ByteTextDataModule, ByteWindowDataset, default_corpus_bytes


# one intra-op thread per test: tests/conftest.py


def _corpus() -> bytes:
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def test_default_corpus_is_offline_and_long(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the default corpus must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    dm = ByteTextDataModule()
    raw = _corpus()
    # ~466 KB on CPython 3.11 (pydoc topics are not > 1 MB on any current CPython); still ~3,600 windows of 129 bytes
    assert len(raw) > 400_000
    assert default_corpus_bytes() == raw
    assert bytes(dm.data.numpy()) == raw
    assert dm.num_train_samples + dm.num_val_samples == len(raw) // 129


def test_windows_are_the_corpus_shifted_by_one():
    seq = 32
    dm = ByteTextDataModule(seq_len=seq, batch_size=4)
    raw = torch.tensor(list(_corpus()), dtype=torch.long)
    for index in (0, 1, 57, dm.num_train_samples - 1):
        x, y = dm.train_dataset[index]
        start = index * (seq + 1)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (seq,)
        assert torch.equal(x, raw[start:start + seq])
        assert torch.equal(y, raw[start + 1:start + seq + 1])
    # the loader keeps that order without shuffling: batch b row r is window b * batch_size + r
    loader = iter(dm.train_dataloader())
    for b in range(3):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (4, seq)
        windows = raw[b * 4 * (seq + 1):(b + 1) * 4 * (seq + 1)].view(4, seq + 1)
        assert torch.equal(inputs, windows[:, :-1]) and torch.equal(targets, windows[:, 1:])


def test_validation_is_the_last_fraction_of_windows():
    dm = ByteTextDataModule(seq_len=64, batch_size=8, val_fraction=0.1)
    total = len(_corpus()) // 65
    assert dm.num_val_samples == -(-total // 10)
    assert dm.num_train_samples + dm.num_val_samples == total
    raw = torch.tensor(list(_corpus()), dtype=torch.long)
    x, _ = dm.val_dataset[dm.num_val_samples - 1]
    assert torch.equal(x, raw[(total - 1) * 65:(total - 1) * 65 + 64])
    val_inputs = torch.cat([b[0] for b in dm.val_dataloader()])
    assert val_inputs.shape == (dm.num_val_samples, 64)  # no drop_last for evaluation
    test_inputs = torch.cat([b[0] for b in dm.test_dataloader()])
    assert torch.equal(val_inputs, test_inputs)


def test_train_loader_drops_the_last_partial_batch_and_counts():
    dm = ByteTextDataModule(seq_len=16, batch_size=8, max_train_samples=20)
    assert dm.num_train_samples == 20
    assert dm.tokens_per_batch == 8 * 16
    assert [b[0].shape[0] for b in dm.train_dataloader()] == [8, 8]


def test_shuffle_is_deterministic_in_the_seed():
    def first_batch(**kwargs) -> torch.Tensor:
        return next(iter(ByteTextDataModule(seq_len=16, batch_size=8, **kwargs).train_dataloader()))[0]

    torch.manual_seed(1)
    a = first_batch(shuffle=True, seed=3)
    torch.manual_seed(2)
    b = first_batch(shuffle=True, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, first_batch(shuffle=True, seed=4))
    assert not torch.equal(a, first_batch(shuffle=False, seed=3))


def test_custom_text_file(tmp_path):
    text = "héllo wörld, ünïcode bytes — " * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    raw = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    dm = ByteTextDataModule(path=str(path), seq_len=8, batch_size=4, val_fraction=0.0)
    assert dm.num_val_samples == 0
    assert dm.num_train_samples == raw.numel() // 9
    inputs, targets = next(iter(dm.train_dataloader()))
    windows = raw[:4 * 9].view(4, 9)
    assert torch.equal(inputs, windows[:, :-1]) and torch.equal(targets, windows[:, 1:])
    assert ByteTextDataModule(path=path, seq_len=8, batch_size=4).num_train_samples > 0  # a Path works too


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"seq_len": 0}, ValueError, "seq_len"),
    ({"seq_len": -3}, ValueError, "seq_len"),
    ({"seq_len": "64"}, TypeError, "seq_len"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 2.0}, TypeError, "batch_size"),
    ({"val_fraction": -0.1}, ValueError, "val_fraction"),
    ({"val_fraction": 0.5}, ValueError, "val_fraction"),
    ({"val_fraction": 1.2}, ValueError, "val_fraction"),
    ({"num_workers": -1}, ValueError, "num_workers"),
    ({"max_train_samples": 0}, ValueError, "max_train_samples"),
    ({"max_train_samples": 4, "batch_size": 8}, ValueError, "max_train_samples"),
    ({"path": 3}, TypeError, "path"),
])
def test_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ByteTextDataModule(**kwargs)


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="path") as info:
        ByteTextDataModule(path=str(missing))
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"short text"])
def test_text_too_short_for_one_batch(tmp_path, content):
    path = tmp_path / "short.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="path.*fewer than one batch") as info:
        ByteTextDataModule(path=str(path), seq_len=8, batch_size=2)
    assert str(path) in str(info.value)


def test_dataset_index_bounds():
    ds = ByteWindowDataset(torch.arange(20, dtype=torch.uint8), seq_len=4, first=1, count=2)
    assert len(ds) == 2 and torch.equal(ds[-1][0], torch.arange(10, 14))
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError):
        ByteWindowDataset(torch.arange(20, dtype=torch.uint8), seq_len=4, first=3, count=2)


# ---------------------------------------------------------------------------------------------- exact resume
from types import SimpleNamespace  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

from hiermoe_lightning.data.text import ResumableDataLoader, ResumableSampler  # noqa: E402


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_sampler_order_is_distributed_samplers(shuffle, world):
    """Each rank's indices, epoch by epoch, are exactly DistributedSampler(shuffle, seed)'s (padding included)."""
    data = list(range(22))
    for rank in range(world):
        ours = ResumableSampler(data, 2, num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
        ref = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
        assert len(ours) == len(ref)
        for epoch in (0, 1, 2):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref), (rank, epoch)


def _batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_resumes_at_every_batch_of_an_epoch(shuffle):
    """The position saved after k completed batches of epoch 1 restores the rest of that epoch, then epoch 2, on
    every rank; a position at the end of an epoch starts the next one."""
    data, world, b = list(range(26)), 3, 2
    full = {}
    for rank in range(world):
        sampler = ResumableSampler(data, b, num_replicas=world, rank=rank, shuffle=shuffle, seed=1)
        loader = ResumableDataLoader(data, sampler)
        full[rank] = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            full[rank].append(_batches(loader))
    per_epoch = len(full[0][0])
    assert per_epoch == 4  # ceil(26 / 3) = 9 indices per rank (one padded): 4 batches of 2
    for k in range(per_epoch + 1):
        for rank in range(world):
            sampler = ResumableSampler(data, b, num_replicas=world, rank=rank, shuffle=shuffle, seed=1)
            sampler.set_epoch(1)
            state = sampler.state_dict(k)
            assert (state["epoch"], state["samples"], state["batches"]) == (1, 0, 0)  # epoch 1 not begun
            loader = ResumableDataLoader(data, sampler)
            iterator = iter(loader)
            for _ in range(k):
                next(iterator)
            state = loader.state_dict()  # no trainer: the batches this iteration yielded are the completed ones
            assert (state["epoch"], state["samples"], state["batches"]) == (1, k * b * world, k)
            fresh = ResumableSampler(data, b, num_replicas=world, rank=rank, shuffle=shuffle, seed=1)
            fresh_loader = ResumableDataLoader(data, fresh)
            fresh_loader.load_state_dict(state)
            resumed = [] if k == per_epoch else _batches(fresh_loader)
            fresh.set_epoch(2)
            assert resumed + _batches(fresh_loader) == full[rank][0][k:] + full[rank][1], (k, rank)
            assert _batches(fresh_loader) == full[rank][1]  # a later iteration of that epoch: from its start


def test_sampler_resumed_on_another_world_size_continues_at_the_same_sample():
    """Saved on 4 ranks after 2 batches of 2, resumed on 2 ranks: together they read the rest of the epoch's global
    order (no sample repeated or skipped)."""
    data = list(range(40))
    saved = ResumableSampler(data, 2, num_replicas=4, rank=1, shuffle=True, seed=7)
    saved.set_epoch(3)
    order = saved.global_order(3)
    it = iter(saved)
    for _ in range(4):
        next(it)
    state = saved.state_dict(2)
    assert (state["epoch"], state["samples"], state["world_size"]) == (3, 16, 4)
    rest = []
    for rank in range(2):
        s = ResumableSampler(data, 2, num_replicas=2, rank=rank, shuffle=True, seed=7)
        s.load_state_dict(state)
        rest.append(list(s))
    assert sorted(rest[0] + rest[1]) == sorted(order[16:])
    assert [x for pair in zip(*rest) for x in pair] == order[16:]


def test_sampler_warns_when_resumed_with_other_data_settings():
    state = ResumableSampler(list(range(20)), 2, shuffle=True, seed=1).state_dict(0)
    other = ResumableSampler(list(range(20)), 2, shuffle=True, seed=2)
    with pytest.warns(UserWarning, match="seed 1 -> 2"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"epoch": 0})


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"shuffle": 1}, TypeError, "shuffle"),
    ({"num_replicas": 2}, ValueError, "together"),
    ({"num_replicas": 2, "rank": 2}, ValueError, "rank"),
])
def test_sampler_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ResumableSampler(list(range(8)), **{"batch_size": 2, **kwargs})


@pytest.mark.parametrize("use_distributed_sampler, expected", [(True, (4, 2)), (False, (1, 0))])
def test_train_loader_shards_by_the_trainers_ranks(use_distributed_sampler, expected):
    """Built by a 4-process Trainer: rank 2's shard (DistributedSampler style, the datamodule's shuffle and seed);
    with use_distributed_sampler=False every rank reads everything; without a trainer, torch.distributed's world."""
    dm = ByteTextDataModule(seq_len=16, batch_size=2, max_train_samples=40, shuffle=True, seed=3)
    connector = SimpleNamespace(use_distributed_sampler=use_distributed_sampler)
    dm.trainer = SimpleNamespace(world_size=4, global_rank=2, distributed_sampler_kwargs={"num_replicas": 4, "rank": 2},
                                 _accelerator_connector=connector)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning neither replaces nor wraps it
    assert (loader.sampler.num_replicas, loader.sampler.rank) == expected
    assert (loader.sampler.shuffle, loader.sampler.seed) == (True, 3)
    assert len(loader) == 40 // expected[0] // 2
    dm.trainer = None
    assert (dm.train_dataloader().sampler.num_replicas, dm.train_dataloader().sampler.rank) == (1, 0)


class _Record(pl.LightningModule):
    """Records the first byte of every sample of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0][:, 0].tolist())
        return self.lin(batch[0].float()).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _SaveAtBatchStart(pl.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:  # the batch is fetched and not run: where a preemption saves
            trainer.save_checkpoint(self.path)


def _fit_record(root, shuffle, max_steps, ckpt_path=None, callbacks=()):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = _Record()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         default_root_dir=str(root))
    # 20 samples of 3: 6 batches per epoch (the last 2 samples dropped), so 16 steps span 3 epochs
    data = ByteTextDataModule(seq_len=8, batch_size=3, max_train_samples=20, val_fraction=0.0, shuffle=shuffle, seed=3)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("shuffle", [False, True])
def test_lightning_resume_mid_epoch_continues_the_sample_sequence(tmp_path, shuffle):
    """A one-process fit checkpointed at a step inside an epoch (ModelCheckpoint after step 4, after the epoch's last
    batch at step 6, after step 10; trainer.save_checkpoint at the start of step 10's batch) and resumed trains on
    exactly the batches the uninterrupted fit trained on after that step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ck = tmp_path / "ck"
    full = _fit_record(tmp_path, shuffle, 16, callbacks=[ModelCheckpoint(dirpath=str(ck), every_n_train_steps=1,
                                                                         save_top_k=-1),
                                                         _SaveAtBatchStart(9, str(ck / "s9.ckpt"))])
    assert len(full) == 16 and (full[:6] != full[6:12]) == shuffle  # shuffled: each epoch its own order
    for name, done in [("epoch=0-step=4.ckpt", 4), ("epoch=0-step=6.ckpt", 6), ("epoch=1-step=10.ckpt", 10),
                       ("s9.ckpt", 9)]:
        state = torch.load(ck / name, weights_only=False)
        assert state["global_step"] == done
        resumed = _fit_record(tmp_path / name, shuffle, 16, ckpt_path=str(ck / name))
        assert resumed == full[done:], name
