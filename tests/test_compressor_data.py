"""Data loading: digits split and shapes, CIFAR-10 python batches (safely), user factories."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from compressor.train.data import TensorLoader, digits, load_data
from compressor.errors import ConfigError


def test_digits_split_is_fixed_stratified_and_shaped_for_the_model():
    train_a, test_a = digits((64,), 64, seed=0)
    train_b, test_b = digits((1, 8, 8), 64, seed=5)
    assert train_a.inputs.shape == (1347, 64) and test_b.inputs.shape == (450, 1, 8, 8)
    assert torch.equal(test_a.inputs, test_b.inputs.flatten(1))  # the split ignores the training seed
    assert float(train_a.inputs.min()) >= 0.0 and float(train_a.inputs.max()) <= 1.0
    test_counts = torch.bincount(test_a.labels, minlength=10).float()
    all_counts = test_counts + torch.bincount(train_a.labels, minlength=10)
    assert bool(((test_counts - 0.25 * all_counts).abs() <= 1).all())  # stratified
    with pytest.raises(ConfigError, match="64 pixels"):
        digits((3, 32, 32), 64, seed=0)


def test_loader_batches_cover_the_data_and_shuffle_reproducibly():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    a, b = TensorLoader(x, y, 4, shuffle=True, seed=1), TensorLoader(x, y, 4, shuffle=True, seed=1)
    batches = list(a)
    assert len(a) == 3 and [len(lbl) for _, lbl in batches] == [4, 4, 2]
    assert sorted(torch.cat([lbl for _, lbl in batches]).tolist()) == list(range(10))
    assert all(torch.equal(p[1], q[1]) for p, q in zip(batches, b))
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(list(a), batches))  # a new order each epoch


def _write_cifar(folder, n=8):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)


def test_cifar10_batches_load_augment_and_normalise(tmp_path):
    _write_cifar(tmp_path / "cifar")
    train, test = load_data(f"cifar10:{tmp_path / 'cifar'}", (3, 32, 32), batch_size=16, seed=0)
    assert train.inputs.dtype == torch.uint8 and train.inputs.shape == (40, 3, 32, 32)
    x, y = next(iter(test))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (test.inputs[:8].float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(x, expected)
    xa, _ = next(iter(train))
    assert xa.shape == (16, 3, 32, 32)
    # Every augmented image is a flipped or unflipped 32×32 window of the zero-padded original.
    padded = torch.nn.functional.pad(
        (train.inputs.float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
        / torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1), (4, 4, 4, 4))
    train.generator.manual_seed(0)
    order = torch.randperm(40, generator=train.generator)[:16]
    for img, src in zip(xa, order):
        windows = padded[src].unfold(1, 32, 1).unfold(2, 32, 1)  # [3, 9, 9, 32, 32]
        found = any(torch.allclose(windows[:, i, j], cand) for i in range(9) for j in range(9)
                    for cand in (img, img.flip(2)))
        assert found


def test_cifar10_refuses_missing_truncated_and_code_carrying_pickles(tmp_path):
    _write_cifar(tmp_path / "cifar")
    os.remove(tmp_path / "cifar" / "data_batch_3")
    with pytest.raises(ConfigError, match="data_batch_3"):
        load_data(f"cifar10:{tmp_path / 'cifar'}", None, 16, 0)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "cifar" / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": []}, handle)
    with pytest.raises(ConfigError, match="refusing to load"):
        load_data(f"cifar10:{tmp_path / 'cifar'}", None, 16, 0)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "cifar" / "data_batch_3").write_bytes(b"\x80\x04\x95")
    with pytest.raises(ConfigError, match="not a CIFAR-10 python batch"):
        load_data(f"cifar10:{tmp_path / 'cifar'}", None, 16, 0)


def test_factory_may_return_datasets_or_loaders(tmp_path):
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset, DataLoader\n"
        "def build():\n"
        "    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))\n"
        "    return TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5)\n")
    train, test = load_data(f"{tmp_path / 'mydata.py'}:build", None, batch_size=8, seed=0)
    assert isinstance(train, TensorLoader) and train.inputs.shape == (20, 64) and len(train) == 3
    assert [len(y) for _, y in test] == [5, 5, 5, 5]
