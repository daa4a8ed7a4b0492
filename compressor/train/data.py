"""Data sets as in-memory tensors, batched by a plain index loop (no DataLoader workers).

Specs (``--data``):
- ``digits``: scikit-learn's 8×8 digits, a fixed seeded stratified 75/25 split, pixels in [0, 1],
  shaped to the model's ``input_shape`` (64 or 1×8×8); a model that declares none gets 1×8×8 images
  when its first layer is a Conv2d and the flat 64-vector otherwise (:func:`input_shape_for`).
- ``cifar10:DIR``: the python-format CIFAR-10 batches in DIR; random crop (pad 4) + horizontal flip
  for training, per-channel normalisation. Kept as uint8 in memory (150 MB, not 600 MB of floats).
- ``path/to/file.py:factory``: ``factory()`` returns ``(train, test)`` or ``(train, test, loss)``, each
  part a loader (an iterable of ``(inputs, target)`` batches) or a map-style dataset of ``(input,
  target)`` pairs; inputs may be a tensor, a tuple or a dict of tensors (``compressor.train.batches``), and
  ``loss(output, target) -> scalar`` replaces ``--loss``.
Nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from compressor.errors import ConfigError
from compressor.train.models import input_shape_of, load_factory

Batch = Tuple[torch.Tensor, torch.Tensor]
Transform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]

DIGITS_SPLIT_SEED = 0  # fixed so every run (and every teammate) sees the same test split
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class TensorLoader:
    """Mini-batches of in-memory tensors; shuffling and augmentation draw from one ``generator``.

    The generator's state is the loader's whole random state, which is what checkpoints save so a
    resumed run sees the same batches. ``transform(batch, generator)`` runs per batch (e.g. uint8 →
    normalised float, random crops); ``generator`` is ``None`` for evaluation loaders.
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, transform: Optional[Transform] = None) -> None:
        if len(inputs) != len(labels):
            raise ConfigError(f"{len(inputs)} inputs but {len(labels)} labels")
        if len(inputs) == 0:
            raise ConfigError("empty data set")
        # integer class labels as int64; float targets (regression, soft labels) stay as they are
        self.inputs, self.labels = inputs, (labels if labels.is_floating_point() else labels.long())
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.transform = transform
        self.generator: Optional[torch.Generator] = torch.Generator().manual_seed(seed) if shuffle else None

    def __len__(self) -> int:
        return (len(self.inputs) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.inputs)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            x = self.inputs[index]
            if self.transform is not None:
                x = self.transform(x, self.generator)
            yield x, self.labels[index]


def load_data(spec: str, input_shape: Optional[Sequence[int]], batch_size: int,
              seed: int) -> Tuple[Iterable[Batch], Iterable[Batch]]:
    """``(train_loader, test_loader)`` for a ``--data`` spec (see the module docstring)."""
    train, test, _ = load_data_and_loss(spec, input_shape, batch_size, seed)
    return train, test


def load_data_and_loss(spec: str, input_shape: Optional[Sequence[int]], batch_size: int,
                       seed: int) -> Tuple[Iterable[Batch], Iterable[Batch], Optional[Callable]]:
    """``(train_loader, test_loader, loss or None)``: a data factory may bring its own loss."""
    if spec == "digits":
        return (*digits(input_shape, batch_size, seed), None)
    if spec.startswith("cifar10:"):
        return (*cifar10(Path(spec[len("cifar10:"):]), batch_size, seed), None)
    if ":" in spec:
        return from_factory(spec, batch_size, seed)
    raise ConfigError(f"unknown data {spec!r}; use digits, cifar10:DIR or path/to/file.py:factory")


def input_shape_for(model: torch.nn.Module) -> Optional[Tuple[int, ...]]:
    """The input shape the built-in data should take for ``model``: its declared ``input_shape``, else
    ``(C, 8, 8)`` images when its first layer is a Conv2d, ``(F,)`` when it is a Linear, else None (an
    embedding or another first layer: the data's own shape, which the probe before training checks)."""
    declared = input_shape_of(model)
    if declared:
        return declared
    nn = torch.nn
    for module in model.modules():  # registration order: the first layer in almost every model
        if isinstance(module, nn.Conv2d):
            return (int(module.in_channels), 8, 8)
        if isinstance(module, nn.Linear):
            return (int(module.in_features),)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.Conv1d, nn.Conv3d, nn.RNNBase)):
            return None
    return None


def digits(input_shape: Optional[Sequence[int]], batch_size: int, seed: int) -> Tuple[TensorLoader, TensorLoader]:
    """scikit-learn's digits, shaped as the model wants (flattened 64 by default)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    shape = tuple(input_shape) if input_shape else (64,)
    if int(np.prod(shape)) != 64:
        raise ConfigError(f"the digits are 1×8×8 grayscale images (64 pixels); the model wants input shape "
                          f"{shape}: use --data path/to/file.py:factory for other data")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixels are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=0.25, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)

    def tensors(a: np.ndarray, b: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(a).reshape(-1, *shape), torch.from_numpy(b).long()

    return (TensorLoader(*tensors(x_train, y_train), batch_size, shuffle=True, seed=seed),
            TensorLoader(*tensors(x_test, y_test), max(batch_size, 256)))


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches ARE pickles, and unpickling can run arbitrary code: only the few
    numpy names the batches need may be loaded, so a tampered file fails instead of executing."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"CIFAR-10 batch not found: {path} (expected data_batch_1..5 and test_batch)")
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as error:  # truncated file, wrong format, forbidden class: all the user's to fix
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: {type(error).__name__}: {error}") from error
    if len(data) != len(labels):
        raise ConfigError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def cifar_transform(train: bool) -> Transform:
    """uint8 NCHW → normalised float; for training also random crop (pad 4) and horizontal flip."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def transform(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        x = (x.float() / 255.0 - mean) / std
        if not train:
            return x
        n = x.shape[0]
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        # One gather for the whole batch: per-example row/column offsets in [0, 8].
        dy = torch.randint(0, 9, (n,), generator=generator)
        dx = torch.randint(0, 9, (n,), generator=generator)
        base = torch.arange(32)
        rows = (dy[:, None] + base)[:, None, :, None].expand(n, 3, 32, 32)
        cols = (dx[:, None] + base)[:, None, None, :].expand(n, 3, 32, 32)
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        flip = torch.rand(n, generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    return transform


def cifar10(folder: Path, batch_size: int, seed: int) -> Tuple[TensorLoader, TensorLoader]:
    """CIFAR-10 from its python-format batches in ``folder``."""
    if not folder.is_dir():
        raise ConfigError(f"CIFAR-10 folder not found: {folder}")
    parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_train = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y_train = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    x_test, y_test = (torch.from_numpy(a) for a in _read_cifar_batch(folder / "test_batch"))
    return (TensorLoader(x_train, y_train, batch_size, shuffle=True, seed=seed, transform=cifar_transform(True)),
            TensorLoader(x_test, y_test, max(batch_size, 500), transform=cifar_transform(False)))


def _as_loader(obj: Any, what: str, spec: str, batch_size: int, shuffle: bool, seed: int) -> Iterable[Batch]:
    """A user's loader as is; a user's map-style dataset materialised into a ``TensorLoader``."""
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (tuple, list, str)):
        try:
            first = obj[0]
            if not isinstance(first[0], (torch.Tensor, np.ndarray, list, float, int)):
                return _collated(obj, batch_size, shuffle, seed)  # dict / tuple inputs: torch's collate
            items = [obj[i] for i in range(len(obj))]
            inputs = torch.stack([torch.as_tensor(item[0]) for item in items])
            inputs = inputs.float() if inputs.dtype == torch.float64 else inputs  # int token ids stay ints
            labels = torch.stack([torch.as_tensor(item[1]) for item in items])
        except Exception as error:
            raise ConfigError(f"{spec}: the {what} dataset does not yield (input, target) pairs: {error}") from error
        return TensorLoader(inputs, labels, batch_size, shuffle=shuffle, seed=seed)
    if hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes)):
        return obj
    raise ConfigError(f"{spec}: the {what} part is a {type(obj).__name__}, not a loader or dataset")


def _collated(dataset: Any, batch_size: int, shuffle: bool, seed: int) -> Iterable[Batch]:
    """A map-style dataset whose inputs are dicts or tuples, batched by torch's default collate; the
    loader's seeded ``generator`` is what checkpoints save, as for ``TensorLoader``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def from_factory(spec: str, batch_size: int, seed: int
                 ) -> Tuple[Iterable[Batch], Iterable[Batch], Optional[Callable]]:
    """Call a user's ``file.py:factory`` that returns ``(train, test)`` or ``(train, test, loss)``."""
    factory = load_factory(spec)
    try:
        result = factory()
    except Exception as error:
        raise ConfigError(f"data factory {spec} raised {type(error).__name__}: {error}") from error
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ConfigError(f"data factory {spec} must return (train, test) or (train, test, loss), "
                          f"got {type(result).__name__}")
    loss = result[2] if len(result) == 3 else None
    if loss is not None and not callable(loss):
        raise ConfigError(f"data factory {spec}: the third item (the loss) is a {type(loss).__name__}, not callable")
    return (_as_loader(result[0], "train", spec, batch_size, True, seed),
            _as_loader(result[1], "test", spec, batch_size, False, seed), loss)
