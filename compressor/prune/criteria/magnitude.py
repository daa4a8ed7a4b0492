"""Global magnitude (unstructured): one threshold over |w| of every surviving prunable weight."""

from __future__ import annotations

from typing import Dict

import torch

from compressor.prune.criteria.base import WeightCriterion
from compressor.prune.mask import Mask
from compressor.prune.weights import global_magnitude_prune


class GlobalMagnitude(WeightCriterion):
    """Renda et al. (2020) / OpenLTH ``sparse_global``: the ``keep`` largest |w| survive."""

    def prune(self, params: Dict[str, torch.Tensor], mask: Mask, keep: int, floor: float = 0.0) -> Mask:
        return global_magnitude_prune(params, mask, keep, floor=floor)
