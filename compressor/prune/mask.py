"""``Mask``: which prunable weights survive, as ``{parameter name: bool tensor}`` (OpenLTH style).

A mask validates itself on construction (non-empty names, boolean tensors) and knows its own
sparsity, so the rest of the code never re-derives these facts.
"""

from __future__ import annotations

from typing import Dict, Iterator, Mapping

import torch
from torch import nn

from compressor.errors import CheckpointError


class Mask(Mapping[str, torch.Tensor]):
    """An immutable mapping from parameter name to a boolean keep-tensor of the parameter's shape."""

    def __init__(self, entries: Mapping[str, torch.Tensor]) -> None:
        checked: Dict[str, torch.Tensor] = {}
        for name, tensor in entries.items():
            if not isinstance(name, str) or not name:
                raise CheckpointError(f"mask entry has an invalid name: {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"mask entry {name!r} is not a tensor")
            if tensor.dtype != torch.bool:
                # Accept 0/1 tensors from other tools, nothing else.
                if not bool(((tensor == 0) | (tensor == 1)).all()):
                    raise CheckpointError(f"mask entry {name!r} holds values other than 0 and 1")
                tensor = tensor.to(torch.bool)
            checked[name] = tensor
        self._entries = checked

    @classmethod
    def ones_like(cls, params: Mapping[str, torch.Tensor]) -> "Mask":
        """The dense mask: every weight survives."""
        return cls({name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total(self) -> int:
        """Number of weights the mask covers."""
        return sum(t.numel() for t in self._entries.values())

    @property
    def kept(self) -> int:
        """Number of surviving weights."""
        return sum(int(t.sum()) for t in self._entries.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the covered weights that are pruned."""
        return 1.0 - self.kept / self.total if self.total else 0.0

    def to(self, device: torch.device) -> "Mask":
        return Mask({name: t.to(device) for name, t in self._entries.items()})

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Plain ``{name: bool tensor}`` on the CPU, for checkpoints."""
        return {name: t.detach().cpu().clone() for name, t in self._entries.items()}

    def check_fits(self, model: nn.Module) -> None:
        """Raise ``CheckpointError`` unless every entry names a parameter of the same shape."""
        params = dict(model.named_parameters())
        for name, tensor in self._entries.items():
            if name not in params:
                raise CheckpointError(f"mask names {name!r}, which the model does not have")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"mask for {name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}"
                )
