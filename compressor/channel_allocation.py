"""How many channels each coupled group keeps: ``--allocate global`` or ``--allocate latency``.

``global`` (``compressor.channels.Ranking``) removes the channels with the lowest criterion scores
wherever they are, then rounds each group's width: it spends the round's budget where channels are
weakest, blind to what removing them saves at run time.

``latency`` (this module) is NetAdapt/HALP-style: the round removes channels one *step* at a time
(a group's width goes down to a narrower allowed width: a multiple of ``--channel-multiple``, or
``--min-channels``), always taking the step that loses the least importance per millisecond saved:

    cost(step) = sum of the criterion scores of the channels the step removes
                 / (predicted latency now - predicted latency after the step)

The predicted latency of a network is the sum of its Conv/Linear layers' times in a measured
``LatencyTable`` (``compressor.latency_table``). A layer's widths follow from the groups' widths:
Torch-Pruning's dependency graph says which groups feed which layers' inputs and outputs (a concat
feeds one layer from several groups; a flatten makes one channel many Linear inputs). Steps that save
nothing come last; a step skips the widths that save nothing (on a CPU that computes 16 channels
at a time 64 -> 56 saves nothing, so the step is 64 -> 48) and no more. Which channels go inside a
group is still the criterion's choice (its weakest); with equal latency per channel everywhere this
is the global ranking again.

``global-table`` (``TableRounding``) keeps the global ranking and only changes the rounding: each
group's width goes to the nearest width on its ladder that the table finds faster than the next
wider one — the device's own channel multiple, read from its table.

Every step keeps a width the rounding allows, never below the floor, never touches ``--exclude``d
layers (they are in no group), so no layer disappears. The move sequence is computed once per round;
``plan(n)`` applies its first ``n`` moves, so the binary searches of ``ChannelLevels`` work unchanged.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from compressor.channels import PRUNABLE, ChannelPlan, Group, Ranking, _full_group, _is_depthwise, trace
from compressor.errors import ConfigError
from compressor.latency_table import LatencyTable, LatencyTableError, LayerShape

MAX_SHAPES = 5000  # a table this large takes minutes to measure: the multiple is too fine for this model
MIN_SAVING = 0.03  # a narrower width must save this fraction of its group's layers' time to be worth having


def step_of(g: Group, multiple: int) -> int:
    """Units per rounding step of ``g`` (a unit is one channel in every block of a grouped conv)."""
    return max(1, multiple // math.gcd(multiple, g.blocks))


def ladder(g: Group, have_units: int, multiple: int, narrowest: int) -> List[int]:
    """The unit counts ``g`` may keep, widest first: what ``Ranking.keep_units`` can round to."""
    if g.blocks == 1 and narrowest != multiple:
        if have_units <= narrowest:
            return [have_units]
        allowed = {narrowest, have_units} | set(range(multiple, have_units + 1, multiple))
        return sorted((w for w in allowed if narrowest <= w <= have_units), reverse=True)
    step = step_of(g, multiple)
    if have_units <= step:
        return [have_units]
    return sorted({have_units} | set(range(step, have_units + 1, step)), reverse=True)


class _Layer:
    """One Conv/Linear and how its widths follow the groups: ``width = dense - sum(ratio * removed_g)``
    (no ratios: a layer no group touches, e.g. an ``--exclude``d one, counted at its dense shape)."""

    def __init__(self, name: str, dense: LayerShape, depthwise: bool) -> None:
        self.name, self.dense, self.depthwise = name, dense, depthwise
        self.inputs: Dict[int, float] = {}  # group index -> input features per removed channel
        self.outputs: Dict[int, float] = {}

    def shape(self, removed: Sequence[int]) -> LayerShape:
        """The layer's shape with ``removed[i]`` channels gone from group ``i``."""
        cin = self.dense.cin - round(sum(r * removed[i] for i, r in self.inputs.items()))
        cout = self.dense.cout - round(sum(r * removed[i] for i, r in self.outputs.items()))
        return self.at(cin, cout)

    def at(self, cin: int, cout: int) -> LayerShape:
        d = self.dense
        if self.depthwise:  # one filter per channel: inputs, outputs and groups shrink together
            cin = cout
        return LayerShape(d.op, cin, cout, d.spatial, d.kernel, d.stride, d.padding, d.dilation,
                          cout if self.depthwise else d.groups)


class LatencyModel:
    """Predicted onnxruntime latency of the template shrunk to any group widths (see the module doc)."""

    def __init__(self, template: nn.Module, example: torch.Tensor, groups: Sequence[Group], multiple: int,
                 min_channels: Optional[int] = None) -> None:
        self.groups, self.multiple = list(groups), multiple
        self.narrowest = min_channels or multiple
        self.layers = _layers(template, example, self.groups)
        self.table: Optional[LatencyTable] = None
        self.touching: List[List[_Layer]] = [[l for l in self.layers if i in l.inputs or i in l.outputs]
                                             for i in range(len(self.groups))]

    def shapes_needed(self) -> List[LayerShape]:
        """Every layer shape any allowed combination of group widths produces (the table to measure)."""
        ladders = [[u * g.blocks for u in ladder(g, g.size // g.blocks, self.multiple, self.narrowest)]
                   for g in self.groups]
        shapes: Dict[str, LayerShape] = {}
        for layer in self.layers:
            ins = _removals(layer.inputs, ladders, self.groups)
            outs = _removals(layer.outputs, ladders, self.groups)
            if len(ins) * len(outs) > MAX_SHAPES:
                raise ConfigError(f"--allocate latency: layer {layer.name!r} alone has {len(ins) * len(outs)} "
                                  f"width combinations to measure; raise --channel-multiple")
            for cut_in in ins:
                for cut_out in outs:
                    shape = layer.at(layer.dense.cin - cut_in, layer.dense.cout - cut_out)
                    shapes.setdefault(shape.key(), shape)
            if len(shapes) > MAX_SHAPES:
                raise ConfigError(f"--allocate latency: more than {MAX_SHAPES} layer shapes to measure; "
                                  f"raise --channel-multiple")
        return list(shapes.values())

    def use(self, table: LatencyTable, source: str) -> None:
        """Predict with ``table``; ``LatencyTableError`` naming what it lacks for this model."""
        missing = table.missing(self.shapes_needed())
        if missing:
            raise LatencyTableError(
                f"{source} lacks {len(missing)} layer shape(s) this run needs (e.g. {missing[0]!r}); measure it "
                f"for this model and multiple: python3 -m compressor.latency_table --model ... --out FILE")
        self.table = table

    def layer_ms(self, layer: _Layer, removed: Sequence[int]) -> float:
        assert self.table is not None, "LatencyModel.use(table) first"
        return self.table.ms[layer.shape(removed).key()]

    def predict(self, widths: Mapping[str, int]) -> float:
        """Milliseconds of the Conv/Linear layers with each group at ``widths[root]`` channels (the
        rest of the graph, BatchNorm folded into convs, activations, adds, is not counted)."""
        removed = [g.size - widths[g.root] for g in self.groups]
        return sum(self.layer_ms(layer, removed) for layer in self.layers)


def _removals(ratios: Mapping[int, float], ladders: Sequence[Sequence[int]], groups: Sequence[Group]) -> Set[int]:
    """Every number of features one side of a layer can lose: sums over the feeding groups' ladders."""
    totals = {0}
    for index, ratio in ratios.items():
        size = groups[index].size
        totals = {t + round(ratio * (size - w)) for t in totals for w in ladders[index]}
    return totals


def _layers(template: nn.Module, example: torch.Tensor, groups: Sequence[Group]) -> List[_Layer]:
    """The template's Conv/Linear layers on the forward path, with their dense shapes and ratios."""
    graph = trace(template, example)
    modules = dict(template.named_modules())
    spatial = _input_sizes(template, example)
    layers: Dict[str, _Layer] = {}
    for index, g in enumerate(groups):
        for item in _full_group(graph, modules[g.root], range(g.size)):
            module = item.dep.target.module
            if not isinstance(module, PRUNABLE):
                continue
            name = next(n for n, m in modules.items() if m is module)
            layer = layers.setdefault(name, _Layer(name, _dense_shape(module, spatial[name]), _is_depthwise(module)))
            side = layer.outputs if graph.is_out_channel_pruning_fn(item.dep.handler) else layer.inputs
            side[index] = side.get(index, 0.0) + len(item.idxs) / g.size
    for name, module in modules.items():  # the layers no group touches cost the same in every plan
        if isinstance(module, PRUNABLE) and name in spatial and name not in layers:
            layers[name] = _Layer(name, _dense_shape(module, spatial[name]), False)
    return [layers[n] for n in modules if n in layers]


def _input_sizes(model: nn.Module, example: torch.Tensor) -> Dict[str, Tuple[int, ...]]:
    """Each Conv/Linear's input size after the channel axis (Linear: the dims before features)."""
    sizes: Dict[str, Tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            def record(mod, inputs, _out, name=name):
                shape = tuple(inputs[0].shape)
                sizes[name] = shape[1:-1] if isinstance(mod, nn.Linear) else shape[2:]
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return sizes


def _dense_shape(module: nn.Module, spatial: Tuple[int, ...]) -> LayerShape:
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.in_features, module.out_features, tuple(spatial))
    padding = module.padding
    if isinstance(padding, str):  # "same"/"valid": the explicit pads onnxruntime would use
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return LayerShape("conv", module.in_channels, module.out_channels, tuple(spatial), tuple(module.kernel_size),
                      tuple(module.stride), tuple(padding) * 2, tuple(module.dilation), module.groups)


class LatencyRanking:
    """``Ranking``'s interface (``units``, ``plan(n)``) over the latency-aware move sequence."""

    def __init__(self, groups: Sequence[Group], current: Mapping[str, Sequence[int]],
                 scores: Mapping[str, torch.Tensor], latency: LatencyModel) -> None:
        self.groups, self.current, self.latency = list(groups), current, latency
        self.unit_scores: Dict[str, torch.Tensor] = {}
        for g in self.groups:
            units = len(current[g.root]) // g.blocks
            self.unit_scores[g.root] = scores[g.root].view(g.blocks, units).mean(0)
        self.moves = self._greedy()

    @property
    def units(self) -> int:
        return len(self.moves)

    def _greedy(self) -> List[Tuple[int, int]]:
        """(group index, units kept) steps, cheapest importance per millisecond first."""
        latency = self.latency
        keep = [len(self.current[g.root]) // g.blocks for g in self.groups]
        ladders = [ladder(g, keep[i], latency.multiple, latency.narrowest) for i, g in enumerate(self.groups)]
        ranked = [torch.sort(self.unit_scores[g.root], descending=True, stable=True).values.tolist()
                  for g in self.groups]
        moves: List[Tuple[int, int]] = []
        while True:
            removed = [g.size - keep[i] * g.blocks for i, g in enumerate(self.groups)]
            best: Optional[Tuple[bool, float, int, int]] = None
            for i, g in enumerate(self.groups):
                move = _next_step(i, g, keep[i], ladders[i], removed, latency)
                if move is None:
                    continue
                new, saved = move
                lost = sum(ranked[i][new:keep[i]]) * g.blocks
                key = (saved <= 0.0, lost / saved if saved > 0.0 else lost, i, -new)
                best = key if best is None or key < best else best
            if best is None:
                return moves
            index, units = best[2], -best[3]
            keep[index] = units
            moves.append((index, units))

    def plan(self, n: int) -> ChannelPlan:
        """The plan after the first ``n`` moves; each group keeps its strongest units."""
        keep = {g.root: len(self.current[g.root]) // g.blocks for g in self.groups}
        for index, units in self.moves[:n]:
            keep[self.groups[index].root] = units
        new: ChannelPlan = {}
        for g in self.groups:
            kept_now = list(self.current[g.root])
            units = len(kept_now) // g.blocks
            strongest = torch.sort(self.unit_scores[g.root], descending=True, stable=True).indices[:keep[g.root]]
            positions = sorted(int(p) for p in strongest)
            new[g.root] = sorted(kept_now[b * units + p] for b in range(g.blocks) for p in positions)
        return new


def _next_step(index: int, g: Group, keep: int, ladder_units: Sequence[int], removed: Sequence[int],
               latency: LatencyModel) -> Optional[Tuple[int, float]]:
    """``g``'s next step down and the milliseconds it saves: the widest narrower width that saves at
    least ``MIN_SAVING`` of its layers' time (so 64 -> 56, which saves nothing where 16 channels are
    computed at once, is skipped for 64 -> 48, but no step jumps further than it must); the
    narrowest width, saving nothing, when none does. None at the floor."""
    lower = [u for u in ladder_units if u < keep]
    if not lower:
        return None
    layers = latency.touching[index]
    now = sum(latency.layer_ms(layer, removed) for layer in layers)
    after = list(removed)
    for units in lower:
        after[index] = g.size - units * g.blocks
        saved = now - sum(latency.layer_ms(layer, after) for layer in layers)
        if saved > MIN_SAVING * now:
            return units, saved
    return lower[-1], 0.0


class TableRounding(Ranking):
    """``--allocate global-table``: the global ranking decides how many channels each group *wants*;
    the latency table decides which widths are worth having. A width is kept on a group's ladder only
    if it is predicted faster than the next wider one kept (by ``MIN_SAVING`` of the group's layers'
    time): on a CPU that computes 16 channels at a time 56 is no faster than 64, so a group that
    wants 58 keeps 64 (channels for free) and one that wants 52 goes to 48 — the device's own
    "channel multiple", read from its table instead of guessed."""

    def __init__(self, groups: Sequence[Group], current: Mapping[str, Sequence[int]],
                 scores: Mapping[str, torch.Tensor], latency: LatencyModel) -> None:
        super().__init__(groups, current, scores, latency.multiple, latency.narrowest)
        self.allowed = {g.root: self._efficient(i, g, latency) for i, g in enumerate(self.groups)}

    def _efficient(self, index: int, g: Group, latency: LatencyModel) -> List[int]:
        """``g``'s ladder (units) without the widths that save nothing over a wider one."""
        removed = [other.size - len(self.current[other.root]) for other in self.groups]
        have = len(self.current[g.root]) // g.blocks
        kept, kept_ms = [], math.inf
        for units in ladder(g, have, self.multiple, self.narrowest):
            removed[index] = g.size - units * g.blocks
            ms = sum(latency.layer_ms(layer, removed) for layer in latency.touching[index])
            if not kept or ms < kept_ms * (1.0 - MIN_SAVING):
                kept.append(units)
                kept_ms = ms
        return kept

    def keep_units(self, g: Group, removed: int) -> int:
        """The allowed width nearest to what the ranking leaves (ties go to the wider)."""
        wanted = len(self.current[g.root]) // g.blocks - removed
        return min(self.allowed[g.root], key=lambda units: (abs(units - wanted), -units))
