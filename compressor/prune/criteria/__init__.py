"""Pruning criteria: a registry of named strategies (OpenLTH's ``pruning/registry.py`` style).

A criterion ranks what a pruning round removes. Three kinds, one per kind of ``--structure``:

- weights (unstructured): ``prune(params, mask, keep) -> Mask`` keeps the ``keep`` best weights;
- channels (structured): ``layer_scores(module) -> Tensor`` scores each output channel of one
  Conv/Linear layer, on a scale comparable across layers (``compressor.prune.channels`` sums them over a
  coupled group and ranks all groups together);
- blocks (depth): ``block_scores(model, blocks, feed) -> {block: score}`` scores whole residual blocks
  (``compressor.prune.blocks``), ``feed`` running the model on a real batch.

A new criterion is one file in this folder and one line in ``REGISTRY``.
"""

from __future__ import annotations

from typing import Dict, Type

from compressor.prune.criteria.base import BlockCriterion, ChannelCriterion, Criterion, WeightCriterion
from compressor.prune.criteria.block_norm import BlockNorm
from compressor.prune.criteria.bn_scale import BatchNormScale
from compressor.prune.criteria.l1_norm import NormalizedL1
from compressor.prune.criteria.magnitude import GlobalMagnitude
from compressor.errors import ConfigError

REGISTRY: Dict[str, Type[Criterion]] = {
    "magnitude": GlobalMagnitude,
    "l1-norm": NormalizedL1,
    "bn-scale": BatchNormScale,
    "block-norm": BlockNorm,
}

DEFAULTS = {"weights": "magnitude", "channels": "l1-norm", "blocks": "block-norm"}


def criterion_named(name: str | None, structure: str) -> Criterion:
    """The criterion ``name`` (default: the structure's), checked to fit ``structure``."""
    name = name or DEFAULTS[structure]
    if name not in REGISTRY:
        raise ConfigError(f"unknown criterion {name!r}; choose from {', '.join(REGISTRY)}")
    criterion = REGISTRY[name]()
    if criterion.structure != structure:
        fits = ", ".join(n for n, c in REGISTRY.items() if c.structure == structure)
        raise ConfigError(f"criterion {name!r} ranks {criterion.structure}, not {structure}; for "
                          f"--structure {structure} choose from {fits}")
    return criterion


def criteria_for(name: str | None, structure: str) -> Dict[str, Criterion]:
    """One criterion per kind that ``structure`` removes (``channels,blocks``: two): ``name`` for its
    own kind, the default for the others; ``name`` must fit one of them."""
    kinds = structure.split(",")
    if name is not None and name in REGISTRY and REGISTRY[name].structure in kinds:
        return {kind: criterion_named(name if REGISTRY[name].structure == kind else None, kind) for kind in kinds}
    if name is not None and name in REGISTRY and len(kinds) > 1:
        fits = ", ".join(n for n, c in REGISTRY.items() if c.structure in kinds)
        raise ConfigError(f"criterion {name!r} ranks {REGISTRY[name].structure}, not {' or '.join(kinds)}; for "
                          f"--structure {structure} choose from {fits}")
    return {kind: criterion_named(name, kind) for kind in kinds}


__all__ = ["REGISTRY", "DEFAULTS", "Criterion", "WeightCriterion", "ChannelCriterion", "BlockCriterion", "criterion_named",
           "criteria_for"]
