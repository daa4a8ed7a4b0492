"""Which device a run uses: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from compressor.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """A ``torch.device`` for ``name``; ``ConfigError`` if it asks for a CUDA device that is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but PyTorch sees no CUDA GPU here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return device
