"""The two kinds of pruning criterion (see ``compressor.prune.criteria``)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from compressor.prune.mask import Mask


class Criterion:
    """Base of every criterion; ``structure`` says which kind of pruning it ranks."""

    structure = ""


class WeightCriterion(Criterion):
    """Unstructured: chooses individual weights."""

    structure = "weights"

    def prune(self, params: Dict[str, torch.Tensor], mask: Mask, keep: int, floor: float = 0.0) -> Mask:
        """The new mask keeping exactly ``keep`` of the weights that ``mask`` still keeps; ``floor``
        is the per-layer minimum (``PruneConfig.layer_floor``) a criterion must honour."""
        raise NotImplementedError


class ChannelCriterion(Criterion):
    """Structured: scores the output channels of single layers."""

    structure = "channels"

    def layer_scores(self, module: nn.Module, bn: Optional[nn.Module] = None) -> torch.Tensor:
        """One score per output channel of ``module`` (higher = more important), normalised so
        scores of different layers can be ranked against each other. ``bn`` is the BatchNorm that
        directly follows the layer, when there is one."""
        raise NotImplementedError


class BlockCriterion(Criterion):
    """Depth: scores whole residual blocks (``compressor.prune.blocks``)."""

    structure = "blocks"

    def block_scores(self, model: nn.Module, blocks: Sequence[str], feed: Callable[[nn.Module], object]) -> Dict[str, float]:
        """One score per block named in ``blocks`` (higher = more important); ``feed(model)`` runs the
        model on a real batch (the run's first test batch), for criteria that look at activations."""
        raise NotImplementedError
