"""Global magnitude pruning: which weights are prunable, how many survive each round, the new mask.

Prunable: the ``weight`` of every ``Conv*d`` and ``Linear`` module (first conv, 1×1 shortcuts and
the classifier included); biases and BatchNorm never. One threshold over all layers: the surviving
magnitudes are sorted once, so layers end at different sparsities (Renda et al. 2020; OpenLTH's
``sparse_global``). A per-layer floor keeps global pruning from removing a whole layer by accident
(a layer whose weights are all small would otherwise go first and cut the network): each layer keeps
at least ``floor`` × the round's overall density of its weights, and always at least one. Relative to
the round's density, so it never conflicts with the target: 0 is pure global pruning, 1 uniform.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from compressor.errors import ConfigError
from compressor.prune.mask import Mask

_PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> Dict[str, nn.Parameter]:
    """``{parameter name: weight}`` of the Conv/Linear layers not named in ``exclude``.

    ``exclude`` holds module names (``fc``, ``net.4``) or their weight names (``fc.weight``); a name
    that matches no prunable layer is an error, so a typo never silently prunes a layer.
    """
    found: Dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, _PRUNABLE_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            found[f"{module_name}.weight" if module_name else "weight"] = module.weight
    wanted = {name if name.endswith(".weight") else f"{name}.weight" for name in exclude}
    unknown = sorted(wanted - set(found))
    if unknown:
        choices = ", ".join(n[: -len(".weight")] for n in found)
        raise ConfigError(f"--exclude: no prunable layer named {unknown[0][: -len('.weight')]!r}; layers: {choices}")
    chosen = {name: p for name, p in found.items() if name not in wanted}
    if not chosen:
        raise ConfigError("the model has no prunable (Conv/Linear) weights left to prune")
    return chosen


def keep_counts(total: int, prune_fraction: float, target_sparsity: float, one_shot: bool) -> List[int]:
    """How many weights survive after each pruning round, ending exactly at the target.

    Densities run ``(1 - prune_fraction) ** k`` while they stay above ``1 - target``; the last round
    prunes to the target itself. When that last step would be a sliver (under half a normal round,
    e.g. 89.3% → 90%), it is folded into the round before, which then removes up to 1.5× the usual
    fraction: a whole retraining for 0.7 points of sparsity buys nothing (90% takes 10 levels, 95%
    13). Counts are rounded from the dense total (not compounded round by round), so rounding error
    never accumulates.
    """
    final = round(total * (1.0 - target_sparsity))
    if final < 1:
        raise ConfigError(f"target sparsity {target_sparsity} would remove all {total} prunable weights")
    if one_shot:
        return [final]
    counts: List[int] = []
    k = 1
    while True:
        count = round(total * (1.0 - prune_fraction) ** k)
        if count <= final:
            break
        if not counts or count < counts[-1]:
            counts.append(count)
        k += 1
    if counts and final > counts[-1] * (1.0 - prune_fraction / 2):
        counts.pop()  # fold the sliver into the previous round (see above)
    return counts + [final]


def layer_minimums(sizes: Dict[str, int], survivors: Dict[str, int], keep: int, floor: float) -> Dict[str, int]:
    """The fewest weights each layer may keep when ``keep`` of all survive: one, plus ``floor`` × its
    share of the rest (about ``floor`` × the overall density × its size), never more than it still has.
    The ones come off the budget first, so the sum is at most ``keep`` for ``floor`` <= 1 and
    ``keep`` >= the number of layers."""
    total = sum(sizes.values())
    spare = keep - len(sizes)
    return {name: min(survivors[name], 1 + math.floor(floor * spare * size / total)) for name, size in sizes.items()}


@torch.no_grad()
def global_magnitude_prune(params: Dict[str, torch.Tensor], mask: Mask, keep: int, floor: float = 0.0) -> Mask:
    """Keep the ``keep`` largest-magnitude surviving weights across all layers; prune the rest.

    One stable sort over the concatenated magnitudes (already-pruned weights get -1 so they sort
    last); taking exactly ``keep`` indices makes the count exact even with tied magnitudes. With
    ``floor`` > 0 each layer's largest :func:`layer_minimums` survivors sort first, so no layer is
    emptied.
    """
    if keep > mask.kept:
        raise ConfigError(f"cannot keep {keep} weights when only {mask.kept} survive")
    names = list(mask)
    if floor > 0 and keep < len(names):
        raise ConfigError(f"keeping {keep} weights cannot leave one in each of the {len(names)} prunable layers; "
                          "lower the target sparsity")
    minimums = layer_minimums({n: params[n].numel() for n in names}, {n: int(mask[n].sum()) for n in names},
                              keep, floor) if floor > 0 else {}
    scores = torch.cat([_scores(params[n], mask[n], minimums.get(n, 0)) for n in names])
    order = torch.sort(scores, descending=True, stable=True).indices
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[order[:keep]] = True
    new: Dict[str, torch.Tensor] = {}
    start = 0
    for n in names:
        size = params[n].numel()
        new[n] = flat[start:start + size].view_as(params[n])
        start += size
    return Mask(new)


def _scores(weight: torch.Tensor, keep: torch.Tensor, reserved: int) -> torch.Tensor:
    """Flat magnitudes to sort by: -1 for pruned weights, +inf for the ``reserved`` largest survivors."""
    scores = torch.where(keep, weight.detach().abs(), torch.full_like(weight, -1.0)).flatten().float()
    if reserved:
        scores[torch.topk(scores, reserved).indices] = float("inf")
    return scores


@torch.no_grad()
def weight_sparsity(params: Dict[str, torch.Tensor]) -> float:
    """Fraction of exactly-zero entries among the given weights, counted from the weights."""
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    return zeros / total if total else 0.0


@torch.no_grad()
def layer_sparsities(params: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per-layer fraction of exactly-zero weights (global pruning leaves them unequal)."""
    return {name: float((p == 0).sum()) / p.numel() for name, p in params.items()}
