"""BatchNorm scale (Liu et al. 2017, "network slimming"): a channel followed by BatchNorm outputs
about ``|gamma_c|`` in magnitude, whatever its filter's norm, so |gamma| (normalised by the layer's
mean, like ``l1-norm``) is the better signal there. Layers without a BatchNorm fall back to the
normalised L1 norm."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from compressor.prune.criteria.base import ChannelCriterion
from compressor.prune.criteria.l1_norm import NormalizedL1


class BatchNormScale(ChannelCriterion):
    """``|gamma_c| / mean |gamma|`` of the following BatchNorm; the L1 norm where there is none."""

    @torch.no_grad()
    def layer_scores(self, module: nn.Module, bn: Optional[nn.Module] = None) -> torch.Tensor:
        if bn is None or getattr(bn, "weight", None) is None:
            return NormalizedL1().layer_scores(module)
        gamma = bn.weight.detach().abs().float()
        return gamma / gamma.mean().clamp_min(1e-12)
