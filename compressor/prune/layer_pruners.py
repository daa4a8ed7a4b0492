"""Channel pruning for the layers Torch-Pruning does not prune itself: Hugging Face's ``Conv1D`` (GPT-2's
projections: a Linear whose weight is stored ``[in, out]``) and the recurrent layers ``nn.GRU``,
``nn.LSTM`` and ``nn.RNN`` of any depth and either direction (Torch-Pruning's own LSTM pruner takes one
layer only, and none of them a GRU).

An RNN's output channels are its hidden units. Removing unit ``j`` removes it in every layer and both
directions (they share one ``hidden_size``): the output features ``j`` and ``H + j`` of a bidirectional
RNN, so its group has two blocks, like a grouped conv's. Its input channels are the first layer's input
columns: an Embedding in front shrinks its dimension with them.

Torch-Pruning reads the coupling of channels from autograd. On the CPU an RNN runs as hundreds of small
ops (gate matmuls per time step), which it would take for elementwise ops tying unrelated channels
together; while tracing, :func:`opaque_rnns` makes each RNN's outputs hang from one node whose only
input is the RNN's input, so the graph sees the RNN as one layer.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (transformers.pytorch_utils), known by its shape rather than imported:
    the compressor does not depend on transformers."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor) \
        and weight.dim() == 2


def is_extra(module: nn.Module) -> bool:
    """Whether ``module`` is one of the layers this module prunes (not Torch-Pruning)."""
    return isinstance(module, nn.RNNBase) or is_hf_conv1d(module)


def out_channels(module: nn.Module) -> Optional[int]:
    """Output channels of an extra layer (an RNN's: hidden size × directions; None with ``proj_size``)."""
    if is_hf_conv1d(module):
        return int(module.weight.shape[1])
    if isinstance(module, nn.RNNBase):
        return None if module.proj_size else module.hidden_size * _directions(module)
    return None


def blocks(module: nn.Module) -> int:
    """Blocks its output channels come in: a bidirectional RNN's unit sits once in each direction."""
    return _directions(module) if isinstance(module, nn.RNNBase) else 1


def channel_rows(module: nn.Module) -> torch.Tensor:
    """The weights each output channel owns, one row per channel (what a criterion scores): Conv1D's
    weight columns; for an RNN unit, its gate rows in every layer's input and hidden weights."""
    if is_hf_conv1d(module):
        return module.weight.detach().t()
    directions = []
    for suffix in _suffixes(module):
        parts = [_unit_rows(getattr(module, f"{kind}_l{layer}{suffix}"), module)
                 for layer in range(module.num_layers) for kind in ("weight_ih", "weight_hh")]
        directions.append(torch.cat(parts, 1))
    return torch.cat(directions, 0)


def _unit_rows(weight: torch.Tensor, rnn: nn.RNNBase) -> torch.Tensor:
    """``[gates·H, K]`` gate rows regrouped per unit: ``[H, gates·K]``."""
    gates = _gates(rnn)
    return weight.detach().view(gates, rnn.hidden_size, -1).permute(1, 0, 2).reshape(rnn.hidden_size, -1)


def _directions(rnn: nn.RNNBase) -> int:
    return 2 if rnn.bidirectional else 1


def _suffixes(rnn: nn.RNNBase) -> Tuple[str, ...]:
    return ("", "_reverse") if rnn.bidirectional else ("",)


def _gates(rnn: nn.RNNBase) -> int:
    return {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)


def _keep(size: int, removed: Sequence[int]) -> List[int]:
    gone = set(int(i) for i in removed)
    return [i for i in range(size) if i not in gone]


def _select(param: nn.Parameter, keep: Sequence[int], dim: int) -> nn.Parameter:
    """A new Parameter holding ``keep``'s slices of ``param`` along ``dim`` (its gradient too)."""
    index = torch.tensor(list(keep), dtype=torch.long, device=param.device)
    pruned = nn.Parameter(torch.index_select(param.data, dim, index), requires_grad=param.requires_grad)
    if param.grad is not None:
        pruned.grad = torch.index_select(param.grad, dim, index)
    return pruned


def _prune_rnn_units(rnn: nn.RNNBase, removed: Sequence[int]) -> nn.RNNBase:
    """Remove output features ``removed`` (dense positions ``d·H + j``) of ``rnn``: unit ``j`` in every layer.
    Raises ValueError unless each unit goes in every direction at once (the group's blocks see to it)."""
    hidden, directions = rnn.hidden_size, _directions(rnn)
    units = sorted({int(i) % hidden for i in removed})
    if sorted(int(i) for i in removed) != [d * hidden + u for d in range(directions) for u in units]:
        raise ValueError(f"a hidden unit of {type(rnn).__name__} must be removed in every direction at once")
    keep = _keep(hidden, units)
    rows = [g * hidden + k for g in range(_gates(rnn)) for k in keep]
    inputs = [d * hidden + k for d in range(directions) for k in keep]  # a deeper layer reads both directions
    for layer in range(rnn.num_layers):
        for suffix in _suffixes(rnn):
            name = f"_l{layer}{suffix}"
            weight_ih = _select(getattr(rnn, "weight_ih" + name), rows, 0)
            setattr(rnn, "weight_ih" + name, _select(weight_ih, inputs, 1) if layer else weight_ih)
            setattr(rnn, "weight_hh" + name, _select(_select(getattr(rnn, "weight_hh" + name), rows, 0), keep, 1))
            if rnn.bias:
                for kind in ("bias_ih", "bias_hh"):
                    setattr(rnn, kind + name, _select(getattr(rnn, kind + name), rows, 0))
    rnn.hidden_size = len(keep)
    return rnn


def _prune_rnn_inputs(rnn: nn.RNNBase, removed: Sequence[int]) -> nn.RNNBase:
    keep = _keep(rnn.input_size, removed)
    for suffix in _suffixes(rnn):
        setattr(rnn, f"weight_ih_l0{suffix}", _select(getattr(rnn, f"weight_ih_l0{suffix}"), keep, 1))
    rnn.input_size = len(keep)
    return rnn


@functools.lru_cache(maxsize=None)
def _pruner_classes() -> Tuple[type, type]:
    # Built on first use: Torch-Pruning is imported only for --structure channels.
    import torch_pruning as tp

    class HFConv1DPruner(tp.pruner.BasePruningFunc):
        """Conv1D: ``y = x @ W + b`` with ``W`` of shape ``[in, out]``."""

        TARGET_MODULES = None

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            keep = _keep(layer.weight.shape[1], idxs)
            layer.weight = _select(layer.weight, keep, 1)
            if layer.bias is not None:
                layer.bias = _select(layer.bias, keep, 0)
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            layer.weight = _select(layer.weight, _keep(layer.weight.shape[0], idxs), 0)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return int(layer.weight.shape[1])

        def get_in_channels(self, layer: nn.Module) -> int:
            return int(layer.weight.shape[0])

    class RNNPruner(tp.pruner.BasePruningFunc):
        """GRU/LSTM/RNN: output channels are hidden units (all layers, both directions), inputs the first
        layer's input columns."""

        TARGET_MODULES = nn.RNNBase

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            if layer.proj_size:
                raise ValueError("an LSTM with proj_size keeps its hidden units")
            return _prune_rnn_units(layer, idxs)

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            return _prune_rnn_inputs(layer, idxs)

        def get_out_channels(self, layer: nn.Module) -> Optional[int]:
            return out_channels(layer)

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.input_size

    return HFConv1DPruner, RNNPruner


def customized_pruners(model: nn.Module) -> Dict[type, Any]:
    """Torch-Pruning's ``customized_pruners`` for the extra layer types in ``model`` (by class)."""
    conv1d, rnn = _pruner_classes()
    found: Dict[type, Any] = {}
    for module in model.modules():
        if is_hf_conv1d(module):
            found.setdefault(type(module), conv1d())
        elif isinstance(module, nn.RNNBase):
            found.setdefault(type(module), rnn())
    return found


class _Opaque(torch.autograd.Function):
    """Identity on an RNN's (detached) outputs whose one autograd node hangs from the RNN's input (and
    one of its weights, so the node exists when the input needs no gradient): what tracing sees."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, weight: torch.Tensor, *outputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Tuple[None, ...]:
        return (None,) * (2 + len(grads))  # tracing only: never trained through


def _opaque_outputs(rnn: nn.Module, inputs: Tuple[Any, ...], output: Any) -> Any:
    """The forward hook: ``(sequence, state)`` re-issued from one opaque node (PackedSequence left alone)."""
    if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output[0], torch.Tensor):
        return None
    sequence, state = output
    states = list(state) if isinstance(state, tuple) else [state]
    new = _Opaque.apply(inputs[0], rnn.weight_hh_l0, sequence.detach(), *[s.detach() for s in states])
    return new[0], (tuple(new[1:]) if isinstance(state, tuple) else new[1])


@contextlib.contextmanager
def opaque_rnns(model: nn.Module) -> Iterator[None]:
    """While in effect, every RNN of ``model`` is one node in autograd's graph (see the module's doc).
    Enter it before Torch-Pruning registers its hooks: forward hooks run in order, and its own must see
    the re-issued outputs."""
    hooks = [m.register_forward_hook(_opaque_outputs) for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
