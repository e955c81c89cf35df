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
