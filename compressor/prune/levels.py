"""What ``--structure channels`` / ``blocks`` add to the pipeline: the level-to-level plans and the models they build.

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

``--structure blocks`` (``compressor.prune.blocks``) removes whole residual blocks instead: a level
removes the ``--blocks-per-level`` weakest blocks by the block criterion (``block-norm``: the branch's
``||F(x)|| / ||x||`` on the run's first test batch), and the level that reaches the target removes only
as many as it needs. ``channels,blocks`` starts with block levels, for as long as the channels alone
could not reach the target from what is left, then continues with channel rounds on the shallower
network. A *plan* (:class:`Plan`) is the kept channels of the groups of the network with its removed
blocks gone, plus those blocks' names; every number (params, MACs, predicted latency) is counted on the
network that plan builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from compressor import checkpoints
from compressor.prune.blocks import Block, decode_blocks, find_blocks, remove_blocks, require_blocks
from compressor.prune.channels import (ChannelPlan, Group, Ranking, channel_count, copy_model, decode, encode,
                                 example_input, find_groups, full_plan, group_scores, params_and_macs, shrink,
                                 smallest, widths)
from compressor.prune.allocation import LatencyRanking, TableRounding
from compressor.config import PruneConfig
from compressor.prune.criteria import BlockCriterion, ChannelCriterion, criterion_named
from compressor.errors import ConfigError, StructureError
from compressor.prune.latency import RUN_DIR_NAME, LatencyModel
from edge_runtime.layer_timing import LatencyTable, measure, read_table
from edge_runtime.safe_io import atomic_write_text


def _target(config: PruneConfig) -> Tuple[str, float]:
    """What the run's target counts and the fraction of it to remove."""
    if config.target_speedup is not None:
        return "speedup", 1.0 - 1.0 / config.target_speedup
    if config.target_macs is not None:
        return "macs", float(config.target_macs)
    return "params", float(config.target_sparsity)


@dataclass(frozen=True)
class Plan:
    """One level's network: the kept channels of each group (dense indices) of the template with the
    residual blocks ``blocks`` removed (names, in the model's order)."""

    channels: ChannelPlan
    blocks: Tuple[str, ...] = ()

    def stored(self) -> Dict[str, Any]:
        """What final.pt / checkpoint.pt hold (int64 tensors and strings: ``weights_only`` loads them)."""
        return {"channels": encode(self.channels), "blocks_removed": list(self.blocks)}


@dataclass
class _Depth:
    """The template with some blocks removed, and what planning needs of it (built once per block set)."""

    template: nn.Module
    groups: List[Group]
    latency: Optional[LatencyModel] = None
    plans: Dict[Any, float] = field(default_factory=dict)


Feed = Callable[[nn.Module], object]


class ChannelLevels:
    """The structured side of one run (see the module docstring)."""

    def __init__(self, template: nn.Module, input_shape: Sequence[int], config: PruneConfig,
                 criterion: ChannelCriterion, block_criterion: Optional[BlockCriterion] = None) -> None:
        self.template = copy_model(template).cpu()
        self.example = example_input(input_shape)
        self.config, self.criterion = config, criterion
        self.block_criterion = block_criterion or (criterion_named(None, "blocks") if config.removes_blocks else None)
        self.blocks: List[Block] = find_blocks(self.template, self.example, config.exclude) \
            if config.removes_blocks else []
        if config.removes_blocks:
            require_blocks(self.blocks)
        # Block criteria look at activations: the pipeline sets a real batch; a seeded example otherwise.
        self.feed: Feed = lambda model: model(self.example.to(next(model.parameters()).device))
        self.dense_params, self.dense_macs = params_and_macs(self.template, self.example)
        self.metric, self.target = _target(config)
        self._depths: Dict[Tuple[str, ...], _Depth] = {}
        self.table: Optional[Tuple[LatencyTable, str]] = None
        dense = self._depth(())
        self.groups, self.latency = dense.groups, None
        if config.allocate != "global" or config.target_speedup is not None or config.latency_table is not None:
            self.latency = LatencyModel(self.template, self.example, self.groups, *self._rounding)
            self.latency.shapes_needed()  # a multiple too fine for this model is refused now
            # Read (or measured: about a second) before RUN_DIR is touched, so a bad table or an
            # unreachable --target-speedup writes nothing; a resumed run then uses its stored table.
            if config.latency_table is not None:
                self._use_table(read_table(Path(config.latency_table)), f"--latency-table {config.latency_table}")
            else:
                self._use_table(measure(self.latency.shapes_needed()), "the measured table")
        self._check_reachable()

    def _use_table(self, table: LatencyTable, source: str) -> None:
        """Plan from ``table`` from now on, at every depth (the shallower templates' layers are the dense one's)."""
        assert self.latency is not None
        self.latency.use(table, source)
        self.table = (table, source)
        for key, depth in self._depths.items():
            depth.plans.clear()  # predicted fractions from another table no longer hold
            depth.latency = self.latency if not key else None

    def _depth(self, blocks: Tuple[str, ...]) -> _Depth:
        """The template without ``blocks``, its channel groups and (with a table) its latency model."""
        if blocks not in self._depths:
            template = remove_blocks(copy_model(self.template), self.blocks, blocks) if blocks else self.template
            groups = find_groups(template, self.example, self.config.exclude) if self.config.removes_channels else []
            self._depths[blocks] = _Depth(template, groups)
        depth = self._depths[blocks]
        if depth.latency is None and self.table is not None:
            depth.latency = LatencyModel(depth.template, self.example, depth.groups, *self._rounding)
            depth.latency.use(*self.table)
        return depth

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
        self._use_table(read_table(path, "the run's"), str(path))
        if self.metric == "speedup":
            self._check_reachable()

    @property
    def _rounding(self) -> Tuple[int, Optional[int]]:
        return self.config.channel_multiple, self.config.min_channels

    def dense_plan(self) -> Plan:
        return Plan(full_plan(self.groups))

    def stored_plan(self, saved: Mapping[str, Any], source: str) -> Plan:
        """The plan a level's final.pt or checkpoint.pt holds, checked against the model."""
        blocks = decode_blocks(saved.get("blocks_removed"), self.blocks, source)
        return Plan(decode(saved.get("channels"), self._depth(blocks).groups, source), blocks)

    def build(self, plan: Plan, state: Optional[Dict[str, torch.Tensor]], source: str,
              state_is_dense: bool = False) -> nn.Module:
        """The template shrunk to ``plan`` with ``state`` loaded (a dense state is loaded first and
        sliced with the channels: weight rewinding's snapshot)."""
        model = copy_model(self.template)
        if state is not None and state_is_dense:
            checkpoints.load_into(model, state, source)
        remove_blocks(model, self.blocks, plan.blocks)
        if plan.channels:
            shrink(model, full_plan(self._depth(plan.blocks).groups), plan.channels, self.example)
        if state is not None and not state_is_dense:
            checkpoints.load_into(model, state, source)
        return model

    def shrink_to(self, model: nn.Module, current: Plan, kept: Plan) -> nn.Module:
        """``model`` (built for ``current``) with the blocks and channels ``kept`` drops removed, weights kept."""
        remove_blocks(model, self.blocks, [name for name in kept.blocks if name not in current.blocks])
        return shrink(model, {root: current.channels[root] for root in kept.channels}, kept.channels, self.example)

    def removed(self, plan: Plan) -> float:
        """Fraction of the dense parameters (or MACs, for --target-macs; or predicted latency, for
        --target-speedup) that ``plan`` removes."""
        depth = self._depth(plan.blocks)
        key = tuple((root, tuple(kept)) for root, kept in sorted(plan.channels.items()))
        if key not in depth.plans:
            if self.metric == "speedup":  # the fraction of the predicted latency removed
                depth.plans[key] = 1.0 - self._predicted(plan.blocks, {root: len(kept) for root, kept in plan.channels.items()})
            else:
                params, macs = params_and_macs(self.build(plan, None, ""), self.example)
                depth.plans[key] = 1.0 - (macs / self.dense_macs if self.metric == "macs" else params / self.dense_params)
        return depth.plans[key]

    def _predicted(self, blocks: Tuple[str, ...], group_widths: Mapping[str, int]) -> float:
        """Predicted latency of the network without ``blocks`` and with these group widths, as a
        fraction of the dense one's."""
        assert self.latency is not None
        latency = self._depth(blocks).latency
        assert latency is not None
        return latency.predict(group_widths) / self.latency.predict({g.root: g.size for g in self.groups})

    def next_plan(self, model: nn.Module, current: Plan) -> Tuple[Plan, bool]:
        """The next level's plan from ``model`` (the previous level, trained) and whether it is the last."""
        step = self._block_step(model, current) if self.blocks else None
        if step is not None:
            return step
        if not self.config.removes_channels:
            raise StructureError(self._unreachable())
        depth = self._depth(current.blocks)
        scores = group_scores(model, depth.groups, current.channels, self.criterion, self.example)
        ranking = self._ranking(depth, current.channels, scores)
        at = lambda n: Plan(ranking.plan(n), current.blocks)  # noqa: E731
        if not self.config.one_shot:
            have = channel_count(current.channels)
            want = max(1, round(self.config.prune_fraction * have))
            n = smallest(ranking.units, lambda k: have - channel_count(ranking.plan(k)) >= want)
            plan = at(ranking.units if n is None else n)
            if channel_count(plan.channels) == have:
                raise StructureError(self._unreachable())
            if self.removed(plan) < self.target:
                return plan, False
        n = smallest(ranking.units, lambda k: self.removed(at(k)) >= self.target)
        if n is None:
            raise StructureError(self._unreachable())
        return at(n), True

    def _block_step(self, model: nn.Module, current: Plan) -> Optional[Tuple[Plan, bool]]:
        """A block level's plan, or None when this level is a channel round (blocks are done: the
        channels alone reach the target from here, or no block is left)."""
        remaining = [b.name for b in self.blocks if b.name not in current.blocks]
        if not remaining or (self.config.removes_channels and self._channels_reach(current.blocks)):
            return None
        scores = self.block_criterion.block_scores(model, remaining, self.feed)
        ranked = sorted(remaining, key=lambda name: scores[name])  # stable: ties go in the model's order
        most = len(ranked) if self.config.one_shot else min(self.config.blocks_per_level, len(ranked))
        for count in range(1, most + 1):
            plan = self._without(current, ranked[:count])
            if self.removed(plan) >= self.target:
                return plan, True
            if self.config.removes_channels and self._channels_reach(plan.blocks):
                return plan, False
        if most == len(ranked) and not self.config.removes_channels:
            raise StructureError(self._unreachable())
        return self._without(current, ranked[:most]), False

    def _without(self, current: Plan, names: Sequence[str]) -> Plan:
        """``current`` with the blocks ``names`` removed too (the groups inside them go with them)."""
        gone = set(current.blocks) | set(names)
        blocks = tuple(b.name for b in self.blocks if b.name in gone)
        groups = self._depth(blocks).groups
        return Plan({g.root: list(current.channels.get(g.root, range(g.size))) for g in groups}, blocks)

    def _narrowest(self, blocks: Tuple[str, ...]) -> Plan:
        """Every group of the network without ``blocks`` at its narrowest allowed width."""
        depth = self._depth(blocks)
        uniform = {g.root: torch.zeros(g.size) for g in depth.groups}
        dense = full_plan(depth.groups)
        narrowest = self._ranking(depth, dense, uniform)
        return Plan(narrowest.plan(narrowest.units), blocks)

    def _channels_reach(self, blocks: Tuple[str, ...]) -> bool:
        return self.removed(self._narrowest(blocks)) >= self.target

    def _ranking(self, depth: _Depth, current: ChannelPlan, scores: Mapping[str, torch.Tensor]):
        """The ``--allocate`` choice's ranking of ``current``'s channels (``units``, ``plan(n)``)."""
        if self.config.allocate == "latency":
            return LatencyRanking(depth.groups, current, scores, depth.latency)
        if self.config.allocate == "global-table":
            return TableRounding(depth.groups, current, scores, depth.latency)
        return Ranking(depth.groups, current, scores, *self._rounding)

    def describe(self, model: nn.Module, plan: Plan) -> Dict[str, Any]:
        """final.pt's structured figures: params, MACs, their fractions removed, per-layer widths, the
        blocks removed."""
        params, macs = params_and_macs(model, self.example)
        layer_widths = widths(model)
        figures = {"params": params, "macs": macs, "sparsity": 1.0 - params / self.dense_params,
                   "macs_removed": 1.0 - macs / self.dense_macs, "widths": layer_widths,
                   "structure": self.config.structure, "blocks_removed": list(plan.blocks)}
        if self.table is not None:  # a group's width is its root's
            groups = self._depth(plan.blocks).groups
            figures["predicted_speedup"] = 1.0 / self._predicted(plan.blocks, {g.root: layer_widths[g.root] for g in groups})
        return figures

    def blocks_removed(self, plan: Plan) -> Dict[str, List[str]]:
        """For latency and node counting: each block ``plan`` removes and the Conv/Linear layers that go with it."""
        return {b.name: list(b.layers) for b in self.blocks if b.name in plan.blocks}

    def _most(self) -> float:
        """The most the run can remove: every removable block gone, every group at its narrowest."""
        blocks = tuple(b.name for b in self.blocks)
        return self.removed(self._narrowest(blocks) if self.config.removes_channels else Plan({}, blocks))

    def _check_reachable(self) -> None:
        """Refuse, before anything is trained, a target that even the smallest network misses."""
        if self._most() < self.target:
            raise ConfigError(self._unreachable())

    def _unreachable(self) -> str:
        most = self._most()
        floor = self.config.min_channels or self.config.channel_multiple
        parts = ([f"every prunable group down to {floor} channels"] if self.config.removes_channels else []) + \
                ([f"all {len(self.blocks)} removable blocks removed"] if self.blocks else [])
        smallest_net = " and ".join(parts)
        hint = "lower the target" + (", the multiple or the --exclude list" if self.config.removes_channels
                                     else (" or add channels: --structure channels,blocks"))
        if self.metric == "speedup":
            return (f"--target-speedup {self.config.target_speedup:g} is out of reach: with {smallest_net} the "
                    f"table predicts {1.0 / (1.0 - most):.2f}x; {hint}")
        flag = "--target-macs" if self.metric == "macs" else "--target-sparsity"
        return (f"{flag} {self.target:g} is out of reach: with {smallest_net} at most {most:.1%} of the "
                f"{'MACs' if self.metric == 'macs' else 'parameters'} go; {hint}")
