"""What a model is traced and measured with: one example of its inputs, as a batch of the data gives them.

A tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``: Hugging Face's input_ids, ...),
batch first. The channel groups, the removable blocks and the latency model all call the model on one;
a run stores the one it traced with so readers rebuild its levels alike.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from compressor.errors import StructureError

# What a model is traced with: one example's inputs, batch first, as a batch gives them — a tensor
# (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``: Hugging Face's input_ids, ...).
Example = Any


def example_input(input_shape: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """One seeded float example of ``input_shape`` for tracing, for a model with no data at hand (its own
    generator: the global RNG stays untouched). A run traces a real batch instead (:func:`first_example`)."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((1, *input_shape), generator=generator)
    return example.to(device) if device is not None else example


def first_example(inputs: Example) -> Example:
    """The first example of a batch's inputs (tensor, tuple/list or dict), detached on the CPU: what a
    run traces with, so integer token ids and several or keyword inputs trace as they train."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1].detach().cpu()
    if isinstance(inputs, Mapping):
        return {str(key): first_example(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(first_example(value) for value in inputs)
    raise StructureError(f"--structure channels: batch inputs of type {type(inputs).__name__} are not tensors")


def is_example(value: Any) -> bool:
    """Whether ``value`` is an example (tensors in a tensor, tuple or dict), e.g. as read from final.pt."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def move_example(example: Example, device: torch.device) -> Example:
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, Mapping):
        return {key: value.to(device) for key, value in example.items()}
    return tuple(value.to(device) for value in example)


def call_example(model: nn.Module, example: Example) -> Any:
    """``model`` on ``example`` (moved to the model's device), called as the batch says."""
    example = move_example(example, device_of(model))
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def no_cache(model: Any) -> Iterator[None]:
    """A Hugging Face model runs with ``config.use_cache = False``: a key/value cache (DynamicCache,
    EncoderDecoderCache) is generation state, not an output an edge model returns; no exporter takes it,
    and Torch-Pruning cannot follow the concatenations that fill it. The caller's setting is restored."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before:
        config.use_cache = False
    try:
        yield
    finally:
        if before:
            config.use_cache = before
