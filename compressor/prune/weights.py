"""Global magnitude pruning: which weights are prunable, how many survive each round, the new mask.

Prunable: every weight *matrix* a user would expect to shrink (:func:`prunable_parameters`): the
``weight`` of every Conv, Linear and Embedding (first conv, 1×1 shortcuts, the classifier, Hugging
Face's ``Conv1D`` included), every ``weight_ih_l*``/``weight_hh_l*`` of an RNN/GRU/LSTM (all layers
and directions) and ``nn.MultiheadAttention``'s ``in_proj_weight`` (or ``q/k/v_proj_weight``; its
``out_proj`` is a Linear); biases, norms, layer scales and bare 2-D parameters (position embeddings,
attention biases) never — those are reported as left dense (:func:`dense_leftovers`). One threshold over all layers: the surviving
magnitudes are sorted once, so layers end at different sparsities (Renda et al. 2020; OpenLTH's
``sparse_global``). A per-layer floor keeps global pruning from removing a whole layer by accident
(a layer whose weights are all small would otherwise go first and cut the network): each layer keeps
at least ``floor`` × the round's overall density of its weights, and always at least one. Relative to
the round's density, so it never conflicts with the target: 0 is pure global pruning, 1 uniform.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from compressor.errors import ConfigError
from compressor.prune.mask import Mask

# A module's own parameters that are weight matrices: ``weight`` (Conv, Linear, Embedding, HF Conv1D,
# Bilinear), an RNN's ``weight_ih_l0``/``weight_hh_l1_reverse``, MultiheadAttention's ``in_proj_weight``.
_WEIGHT_NAME = re.compile(r"weight|weight_(ih|hh)_l\d+(_reverse)?|(in|q|k|v)_proj_weight")
# Left-dense tensors are warned about when together they hold at least this share of the parameters.
DENSE_WARN_SHARE = 0.05


def _weight_matrices(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every weight matrix (>= 2 dims) owned by a module, by its full parameter name; a tied one (GPT-2's
    ``lm_head.weight`` is ``wte.weight``) once, under the name ``named_parameters`` gives it."""
    found: Dict[str, nn.Parameter] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for own, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and _WEIGHT_NAME.fullmatch(own) and id(param) not in seen:
                seen.add(id(param))
                found[f"{module_name}.{own}" if module_name else own] = param
    return found


def _excluded(name: str, exclude: Sequence[str]) -> Optional[str]:
    """The ``exclude`` entry that names ``name``: the parameter itself or a module holding it."""
    return next((e for e in exclude if name == e or name.startswith(f"{e}.")), None)


def prunable_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> Dict[str, nn.Parameter]:
    """``{parameter name: weight}`` of every weight matrix (see the module docstring) not in ``exclude``.

    ``exclude`` holds module names (``fc``, ``net.4``, ``gru``: all of its weights) or parameter names
    (``fc.weight``, ``gru.weight_hh_l0``); a name that matches no prunable weight is an error, so a
    typo never silently prunes a layer.
    """
    found = _weight_matrices(model)
    unknown = [e for e in exclude if not any(_excluded(name, [e]) for name in found)]
    if unknown:
        choices = ", ".join(n[: -len(".weight")] if n.endswith(".weight") else n for n in found)
        raise ConfigError(f"--exclude: no prunable layer named {unknown[0]!r}; layers: {choices}")
    chosen = {name: p for name, p in found.items() if _excluded(name, exclude) is None}
    if not chosen:
        raise ConfigError("the model has no prunable (Conv/Linear/Embedding/RNN) weights left to prune")
    return chosen


def dense_leftovers(model: nn.Module, prunable: Mapping[str, torch.Tensor]) -> Optional[str]:
    """One warning line naming the large tensors left dense (not prunable, not excluded by the user),
    when together they hold at least :data:`DENSE_WARN_SHARE` of the parameters; else None. Pruning
    the rest to the target then leaves the whole model visibly less sparse, so the user hears why."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    matrices = _weight_matrices(model)
    left = {n: p.numel() for n, p in params.items() if n not in prunable and n not in matrices and p.dim() >= 2}
    share = sum(left.values()) / max(total, 1)
    if not left or share < DENSE_WARN_SHARE:
        return None
    biggest = sorted(left.items(), key=lambda item: -item[1])[:3]
    named = ", ".join(f"{n} ({size:,})" for n, size in biggest) + (", ..." if len(left) > 3 else "")
    return (f"warning: {share:.1%} of the parameters are in tensors that are not weight matrices and stay dense: "
            f"{named}; --target-sparsity counts the prunable weights only")


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


@torch.no_grad()
def model_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries among all of the model's parameters (biases, norms included)."""
    return weight_sparsity(dict(model.named_parameters()))
