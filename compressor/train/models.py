"""The model registry: built-in networks and user factories (``path/to/file.py:factory``).

Built in:
- ``digits-mlp``: 64 → 128 → 64 → 10 for scikit-learn's 8×8 digits, flattened.
- ``digits-wide-mlp``: 64 → 1024 → 1024 → 10, wide enough that sparse kernels pay off at batch 1
  (the demo's model).
- ``digits-cnn``: a small CNN for the digits as 1×8×8 images.
- ``resnet20``: the CIFAR-10 ResNet-20 of He et al. (2016), option A shortcuts replaced by the 1×1
  projection shortcuts that the pruning papers (and OpenLTH) use.

Each model carries ``input_shape`` (one example, without the batch dimension), which data loading
and export use so that nobody has to guess how to feed it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from compressor.errors import ConfigError


class DigitsMLP(nn.Module):
    input_shape: Tuple[int, ...] = (64,)

    def __init__(self, hidden: Tuple[int, ...] = (128, 64), num_classes: int = 10) -> None:
        super().__init__()
        layers, width = [], 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class DigitsCNN(nn.Module):
    input_shape: Tuple[int, ...] = (1, 8, 8)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm; a 1×1 projection shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: 16/32/64 channels, n blocks per stage."""

    input_shape: Tuple[int, ...] = (3, 32, 32)

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


BUILTIN: Dict[str, Callable[[], nn.Module]] = {
    "digits-mlp": DigitsMLP,
    "digits-wide-mlp": lambda: DigitsMLP(hidden=(1024, 1024)),
    "digits-cnn": DigitsCNN,
    "resnet20": lambda: CifarResNet(20),
    "resnet56": lambda: CifarResNet(56),
}


def is_factory_spec(name: str) -> bool:
    """Whether ``name`` names a user file (``path/to/file.py:factory``) rather than a built-in model."""
    return name not in BUILTIN and ":" in name


def _split_spec(spec: str) -> Tuple[Path, str]:
    path_text, sep, attr = spec.rpartition(":")
    if not sep or not path_text or not attr:
        raise ConfigError(f"expected PATH.py:FUNCTION, got {spec!r}")
    return Path(path_text), attr


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def factory_record(spec: str) -> Tuple[str, Optional[str]]:
    """``(spec with an absolute path, sha256 of the file)`` for a factory spec whose file exists.

    What a RUN_DIR records: an absolute path lets a run be read from any folder, and the sha256 lets
    a reader see whether the file it is asked to trust is the one the run was made with. Built-in
    names (and specs without a file) come back unchanged, with no hash.
    """
    if not is_factory_spec(spec):
        return spec, None
    path, attr = _split_spec(spec)
    if not path.is_file():
        return spec, None
    return f"{path.resolve()}:{attr}", file_sha256(path)


def load_factory(spec: str, expect_sha256: Optional[str] = None) -> Callable[..., object]:
    """Import ``path/to/file.py:name`` and return the callable ``name``; a clear error otherwise.

    With ``expect_sha256``, the bytes read are hashed first and run only if they match: the code
    executed is exactly the code that was checked (no window to swap the file in between).
    """
    path, attr = _split_spec(spec)
    if not path.is_file():
        raise ConfigError(f"factory file not found: {path}")
    source = path.read_bytes()
    if expect_sha256 is not None and hashlib.sha256(source).hexdigest() != expect_sha256:
        raise ConfigError(f"{path} changed while it was being checked; try again")
    module_spec = importlib.util.spec_from_file_location(f"edgeprune_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the user named this file
    except Exception as error:  # the user's code: report, don't crash with our traceback
        raise ConfigError(f"importing {path} failed: {type(error).__name__}: {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{path} has no callable named {attr!r}")
    return factory


def build_model(name: str, expect_sha256: Optional[str] = None) -> nn.Module:
    """Build a registered model by name, or a user model from ``path/to/file.py:factory``.

    Only for names the user gave (a command line, an API call): never for a name read from a file
    someone else wrote (``compressor.run.run_dir`` decides what a RUN_DIR's name may run).
    """
    if name in BUILTIN:
        return BUILTIN[name]()
    if ":" not in name:
        known = ", ".join(sorted(BUILTIN))
        raise ConfigError(f"unknown model {name!r}; built in: {known}; or give path/to/file.py:factory")
    factory = load_factory(name, expect_sha256)
    try:
        model = factory()
    except Exception as error:
        raise ConfigError(f"model factory {name} raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def input_shape_of(model: nn.Module) -> Tuple[int, ...] | None:
    """The per-example input shape a model declares (``model.input_shape``), if it declares one."""
    shape = getattr(model, "input_shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None
