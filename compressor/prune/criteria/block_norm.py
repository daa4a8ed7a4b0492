"""Block norm: how much a residual block changes what flows through it, ``||F(x)|| / ||x||``.

A block computes ``x + F(x)``; where its branch ``F`` adds little next to the identity path (on real
inputs, with the trained weights and BatchNorm statistics), dropping the block changes the network
least (Veit et al. 2016: residual networks behave like ensembles of shallower paths, and deleting a
block with a small contribution costs little). The ratio is over one real batch, so blocks of
different stages (different widths and resolutions) compare fairly.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import nn

from compressor.prune.blocks import block_inputs, branch_of
from compressor.prune.criteria.base import BlockCriterion


class BlockNorm(BlockCriterion):
    """``||F(x)||_2 / ||x||_2`` of each block's branch on the batch ``feed`` runs."""

    @torch.no_grad()
    def block_scores(self, model: nn.Module, blocks: Sequence[str], feed: Callable[[nn.Module], object]) -> Dict[str, float]:
        inputs = block_inputs(model, blocks, feed)
        was_training = model.training
        model.eval()
        try:
            scores = {}
            for name in blocks:
                x = inputs[name]
                branch = branch_of(model.get_submodule(name))(x)
                scores[name] = float(branch.norm() / x.norm().clamp_min(1e-12))
        finally:
            model.train(was_training)
        return scores
