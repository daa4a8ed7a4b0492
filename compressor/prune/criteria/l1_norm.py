"""L1 filter norm (Li et al. 2017), normalised per layer so that one global ranking is fair.

Raw filter norms do not compare across layers: a 3×3 conv with 64 input channels sums 576 weights
per filter, the first conv 27, and initialisation scales each layer by 1/sqrt(fan-in); BatchNorm
after a conv also makes the conv's overall scale arbitrary. Each filter's L1 norm is therefore
divided by the mean filter L1 norm of its own layer: a score of 0.3 means "a third of this layer's
typical filter", whatever the layer's fan-in or scale, and a global threshold removes the filters
that are weakest relative to their neighbours.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from compressor.prune.criteria.base import ChannelCriterion


class NormalizedL1(ChannelCriterion):
    """``|W_c|_1 / mean_c' |W_c'|_1`` for each output channel ``c`` of the layer."""

    @torch.no_grad()
    def layer_scores(self, module: nn.Module, bn: Optional[nn.Module] = None) -> torch.Tensor:
        norms = module.weight.detach().abs().flatten(1).sum(1).float()
        return norms / norms.mean().clamp_min(1e-12)
