"""Optimizer construction, kept apart from the training loop (so DDP can wrap the model first)."""

from __future__ import annotations

import torch
from torch import nn

from compressor.config import PruneConfig


def build_optimizer(model: nn.Module, config: PruneConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay; the LR is set per step by the training loop."""
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)
