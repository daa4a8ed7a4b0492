"""How many channels each coupled group keeps: ``--allocate global`` or ``--allocate latency``.

``global`` (``compressor.prune.channels.Ranking``) removes the channels with the lowest criterion scores
wherever they are, then rounds each group's width: it spends the round's budget where channels are
weakest, blind to what removing them saves at run time.

``latency`` (this module) is NetAdapt/HALP-style: the round removes channels one *step* at a time
(a group's width goes down to a narrower allowed width: a multiple of ``--channel-multiple``, or
``--min-channels``), always taking the step that loses the least importance per millisecond saved:

    cost(step) = sum of the criterion scores of the channels the step removes
                 / (predicted latency now - predicted latency after the step)

The predicted latency of a network is the sum of its Conv/Linear layers' times in a measured
``LatencyTable`` (``compressor.prune.latency``). A layer's widths follow from the groups' widths:
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
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from compressor.prune.channels import ChannelPlan, Group, Ranking
from compressor.prune.latency import LatencyModel, ladder

MIN_SAVING = 0.03  # a narrower width must save this fraction of its group's layers' time to be worth having


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
    computed at once, is skipped for 64 -> 48, but no step jumps further than it must); the next
    width, saving nothing, when none does (such steps come last). None at the floor."""
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
    return lower[0], 0.0  # one notch: a flat table must not send a group to its floor in one move


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

    def floor(self, g: Group) -> int:
        """The narrowest width anywhere: the table, not a rule, decides which narrow widths are worth it."""
        return self.narrowest

    def keep_units(self, g: Group, removed: int) -> int:
        """The allowed width nearest to what the ranking leaves (ties go to the wider)."""
        wanted = len(self.current[g.root]) // g.blocks - removed
        return min(self.allowed[g.root], key=lambda units: (abs(units - wanted), -units))
