"""What ``--structure channels`` adds to the pipeline: the level-to-level plans and the models they build.

One object per run holds the dense template (the architecture, never pruned itself), its channel
groups, the dense parameter and MAC counts, and the target. Each level asks it for the next plan
(computed from the previous level's trained weights, so a resumed run computes the same plan) and
for the model that plan describes. Levels are not counted in advance as for weights: a round removes
``--prune-fraction`` of the remaining prunable channels, and the round whose plan would reach the
target instead prunes to the smallest plan that reaches it exactly — that level is the last.

How many channels each group keeps is ``--allocate``'s: ``global`` ranks all channels together
(``channels.Ranking``); ``latency`` takes the steps that lose the least importance per millisecond
saved (``channel_allocation.LatencyRanking``), predicted from a latency table that the run measures
once (or reads from ``--latency-table``) and keeps as ``RUN_DIR/latency_table.json``: a resumed run
reads that file back, so it plans exactly as the interrupted one did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from compressor import checkpoints
from compressor.prune.channels import (ChannelPlan, Example, Ranking, channel_count, copy_model, example_input, find_groups,
                                 full_plan, group_scores, params_and_macs, shrink, smallest, widths)
from compressor.prune.allocation import LatencyRanking, TableRounding
from compressor.config import PruneConfig
from compressor.prune.criteria import ChannelCriterion
from compressor.errors import ConfigError, StructureError
from compressor.prune.latency import RUN_DIR_NAME, LatencyModel
from edge_runtime.layer_timing import measure, read_table
from edge_runtime.safe_io import atomic_write_text


def _target(config: PruneConfig) -> Tuple[str, float]:
    """What the run's target counts and the fraction of it to remove."""
    if config.target_speedup is not None:
        return "speedup", 1.0 - 1.0 / config.target_speedup
    if config.target_macs is not None:
        return "macs", float(config.target_macs)
    return "params", float(config.target_sparsity)


class ChannelLevels:
    """The structured side of one run (see the module docstring)."""

    def __init__(self, template: nn.Module, input_shape: Optional[Sequence[int]], config: PruneConfig,
                 criterion: ChannelCriterion, example: Optional[Example] = None) -> None:
        """Traces ``template`` on ``example`` (one example of the data; default: seeded noise of
        ``input_shape``)."""
        self.template = copy_model(template).cpu()
        if example is None and not input_shape:
            raise ConfigError("--structure channels needs example inputs: data to trace with, or the model's "
                              "input shape (model.input_shape)")
        self.example = example if example is not None else example_input(input_shape)
        self.config, self.criterion = config, criterion
        self.groups = find_groups(self.template, self.example, config.exclude)
        self.dense_params, self.dense_macs = params_and_macs(self.template, self.example)
        self.metric, self.target = _target(config)
        self._cache: Dict[Tuple[Tuple[str, Tuple[int, ...]], ...], float] = {}
        self.latency: Optional[LatencyModel] = None
        if config.allocate != "global":
            self.latency = LatencyModel(self.template, self.example, self.groups, *self._rounding)
            self.latency.shapes_needed()  # a multiple too fine for this model is refused now
            # Read (or measured: about a second) before RUN_DIR is touched, so a bad table or an
            # unreachable --target-speedup writes nothing; a resumed run then uses its stored table.
            if config.latency_table is not None:
                self.latency.use(read_table(Path(config.latency_table)), f"--latency-table {config.latency_table}")
            else:
                self.latency.use(measure(self.latency.shapes_needed()), "the measured table")
        self._check_reachable()

    def attach_table(self, root: Path, is_writer: bool, barrier=lambda: None) -> None:
        """For ``--allocate latency``: the run's table, ``root/latency_table.json``. A new run writes
        it there (``--latency-table``'s, or the one measured on this machine); a resumed run reads it back.
        ``barrier`` lets every torchrun rank read what rank 0 wrote (all plan from the same times)."""
        if self.latency is None:
            return
        path = Path(root) / RUN_DIR_NAME
        if not path.is_file() and is_writer:
            atomic_write_text(path, self.latency.table.to_json())
        barrier()
        self.latency.use(read_table(path, "the run's"), str(path))
        self._cache.clear()  # predicted fractions from the table measured at start no longer hold
        if self.metric == "speedup":
            self._check_reachable()

    @property
    def _rounding(self) -> Tuple[int, Optional[int]]:
        return self.config.channel_multiple, self.config.min_channels

    def dense_plan(self) -> ChannelPlan:
        return full_plan(self.groups)

    def build(self, plan: Mapping[str, Sequence[int]], state: Optional[Dict[str, torch.Tensor]], source: str,
              state_is_dense: bool = False) -> nn.Module:
        """The template shrunk to ``plan`` with ``state`` loaded (a dense state is loaded first and
        sliced with the channels: weight rewinding's snapshot)."""
        model = copy_model(self.template)
        if state is not None and state_is_dense:
            checkpoints.load_into(model, state, source)
        shrink(model, self.dense_plan(), plan, self.example)
        if state is not None and not state_is_dense:
            checkpoints.load_into(model, state, source)
        return model

    def shrink_to(self, model: nn.Module, current: ChannelPlan, kept: ChannelPlan) -> nn.Module:
        """``model`` (built for ``current``) with the channels ``kept`` drops removed, weights kept."""
        return shrink(model, current, kept, self.example)

    def removed(self, plan: Mapping[str, Sequence[int]]) -> float:
        """Fraction of the dense parameters (or MACs, for --target-macs) that ``plan`` removes."""
        key = tuple((root, tuple(kept)) for root, kept in sorted(plan.items()))
        if key not in self._cache:
            if self.metric == "speedup":  # the fraction of the predicted latency removed
                self._cache[key] = 1.0 - self._predicted({root: len(kept) for root, kept in plan.items()})
            else:
                params, macs = params_and_macs(self.build(plan, None, ""), self.example)
                self._cache[key] = 1.0 - (macs / self.dense_macs if self.metric == "macs" else params / self.dense_params)
        return self._cache[key]

    def _predicted(self, group_widths: Mapping[str, int]) -> float:
        """Predicted latency of a network with these group widths, as a fraction of the dense one's."""
        assert self.latency is not None
        return self.latency.predict(group_widths) / self.latency.predict({g.root: g.size for g in self.groups})

    def next_plan(self, model: nn.Module, current: ChannelPlan) -> Tuple[ChannelPlan, bool]:
        """The next level's plan from ``model`` (the previous level, trained) and whether it is the last."""
        scores = group_scores(model, self.groups, current, self.criterion, self.example)
        ranking = self._ranking(current, scores)
        if not self.config.one_shot:
            have = channel_count(current)
            want = max(1, round(self.config.prune_fraction * have))
            n = smallest(ranking.units, lambda k: have - channel_count(ranking.plan(k)) >= want)
            plan = ranking.plan(ranking.units if n is None else n)
            if channel_count(plan) == have:
                raise StructureError(self._unreachable())
            if self.removed(plan) < self.target:
                return plan, False
        n = smallest(ranking.units, lambda k: self.removed(ranking.plan(k)) >= self.target)
        if n is None:
            raise StructureError(self._unreachable())
        return ranking.plan(n), True

    def _ranking(self, current: ChannelPlan, scores: Mapping[str, torch.Tensor]):
        """The ``--allocate`` choice's ranking of ``current``'s channels (``units``, ``plan(n)``)."""
        if self.config.allocate == "latency":
            return LatencyRanking(self.groups, current, scores, self.latency)
        if self.config.allocate == "global-table":
            return TableRounding(self.groups, current, scores, self.latency)
        return Ranking(self.groups, current, scores, *self._rounding)

    def describe(self, model: nn.Module) -> Dict[str, Any]:
        """final.pt's structured figures: params, MACs, their fractions removed, per-layer widths."""
        params, macs = params_and_macs(model, self.example)
        layer_widths = widths(model)
        figures = {"params": params, "macs": macs, "sparsity": 1.0 - params / self.dense_params,
                   "macs_removed": 1.0 - macs / self.dense_macs, "widths": layer_widths, "structure": "channels"}
        if self.latency is not None and self.latency.table is not None:  # a group's width is its root's
            figures["predicted_speedup"] = 1.0 / self._predicted({g.root: layer_widths[g.root] for g in self.groups})
        return figures

    def _check_reachable(self) -> None:
        """Refuse, before anything is trained, a target that even the narrowest network misses."""
        uniform = {g.root: torch.zeros(g.size) for g in self.groups}
        narrowest = self._ranking(self.dense_plan(), uniform)
        if self.removed(narrowest.plan(narrowest.units)) < self.target:
            raise ConfigError(self._unreachable())

    def _unreachable(self) -> str:
        uniform = {g.root: torch.zeros(g.size) for g in self.groups}
        narrowest = self._ranking(self.dense_plan(), uniform)
        most = self.removed(narrowest.plan(narrowest.units))
        floor = self.config.min_channels or self.config.channel_multiple
        if self.metric == "speedup":
            return (f"--target-speedup {self.config.target_speedup:g} is out of reach: with every prunable group "
                    f"down to {floor} channels the table predicts {1.0 / (1.0 - most):.2f}x; lower the target, "
                    f"the multiple or the --exclude list")
        flag = "--target-macs" if self.metric == "macs" else "--target-sparsity"
        return (f"{flag} {self.target:g} is out of reach: with every prunable group down to "
                f"{floor} channels at most {most:.1%} of the "
                f"{'MACs' if self.metric == 'macs' else 'parameters'} go; lower the target, the multiple "
                f"or the --exclude list")
