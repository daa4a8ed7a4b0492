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

``--target-speedup`` and ``--target-latency`` are met as measured: candidate networks are timed
through the run's ``LatencySource`` beside the dense one (kept in ``RUN_DIR/latency_measured.json``),
the table's prediction only steering which candidates to time.

``--structure blocks`` (``compressor.prune.blocks``) removes whole residual blocks instead: a level
removes the ``--blocks-per-level`` weakest blocks by the block criterion (``block-norm``: the branch's
``||F(x)|| / ||x||`` on the run's first test batch), and the level that reaches the target removes only
as many as it needs. ``channels,blocks`` starts with block levels, for as long as the channels alone
could not reach the target from what is left, then continues with channel rounds on the shallower
network. A *plan* (:class:`Plan`) is the kept channels of the groups of the network with its removed
blocks gone, plus those blocks' names; every number (params, MACs, predicted and measured latency) is
counted on the network that plan builds: each depth has its own template copy, groups and latency
model (whose node count comes from that copy's exported graph).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from compressor import checkpoints
from compressor.prune.blocks import Block, decode_blocks, find_blocks, remove_blocks, require_blocks
from compressor.prune.channels import (ChannelPlan, Group, Ranking, channel_count, copy_model, decode, encode,
                                       find_groups, full_plan, group_scores, params_and_macs, shrink, smallest,
                                       widths)
from compressor.prune.examples import call_example, Example, example_input
from compressor.prune.allocation import LatencyRanking, TableRounding
from compressor.config import PruneConfig
from compressor.prune.criteria import BlockCriterion, ChannelCriterion, criterion_named
from compressor.errors import ConfigError, StructureError
from compressor.prune.latency import (CONFIRM_SESSIONS, RUN_DIR_NAME, SESSIONS, LatencyModel, LatencySource,
                                      LocalLatency, default_rounding, network_onnx, quantize_qdq, side_by_side)
from edge_runtime.errors import ModelDirError
from edge_runtime.layer_timing import LatencyTable, LatencyTableError, read_table
from edge_runtime.safe_io import atomic_write_text, read_bounded

log = logging.getLogger("compressor")
ROUNDING_NAME = "rounding.json"  # the default rounding a run measured, so --resume rounds the same
TIMES_NAME = "latency_measured.json"  # whole-network times the run planned with, so --resume plans the same
MAX_TRIES = 8  # candidate networks timed per last level (a bisection: 8 narrow hundreds of plans well)
FILL_STEPS = 3  # notches the last level may add to the plan before the target to land closer to it
FLAT = 0.9  # a table predicting the narrowest network's layers at over 90% of the dense ones' is flat
CONFIRMED = "|confirmed"  # a plan key's suffix: its times from CONFIRM_SESSIONS sessions (a level that ships)
CONFIRM_STEPS = 3  # plans past the search's pick a last level confirms at most, while the confirmation misses


def _target(config: PruneConfig) -> Tuple[str, float]:
    """What the run's target counts and its value: a fraction to remove (macs, params), a speed-up, or
    milliseconds (latency)."""
    if config.target_latency is not None:
        return "latency", float(config.target_latency)
    if config.target_speedup is not None:
        return "speedup", float(config.target_speedup)
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

    def __init__(self, template: nn.Module, input_shape: Optional[Sequence[int]], config: PruneConfig,
                 criterion: Optional[ChannelCriterion], source: Optional[LatencySource] = None,
                 block_criterion: Optional[BlockCriterion] = None, example: Optional[Example] = None) -> None:
        """Traces ``template`` on ``example`` (one example of the data; default: seeded noise of
        ``input_shape``); ``source`` measures latency (default: this machine)."""
        self.template = copy_model(template).cpu()
        if example is None and not input_shape:
            raise ConfigError("--structure channels needs example inputs: data to trace with, or the model's "
                              "input shape (model.input_shape)")
        self.example = example if example is not None else example_input(input_shape)
        self.config, self.criterion = config, criterion
        self.block_criterion = block_criterion or (criterion_named(None, "blocks") if config.removes_blocks else None)
        self.blocks: List[Block] = find_blocks(self.template, self.example, config.exclude) \
            if config.removes_blocks else []
        if config.removes_blocks:
            require_blocks(self.blocks)
        # Block criteria look at activations: the pipeline sets a real batch; a seeded example otherwise.
        self.feed: Feed = lambda model: call_example(model, self.example)
        self.dense_params, self.dense_macs = params_and_macs(self.template, self.example)
        self.metric, self.target = _target(config)
        self.source: LatencySource = source or LocalLatency()
        self.rounding = self._default_rounding() if config.channel_multiple is None else \
            {"multiple": config.channel_multiple, "min_channels": config.min_channels}
        self.timed = self.metric in ("speedup", "latency")  # met as measured: candidates are timed
        self.engine = "ort-int8" if config.quantize == "int8" else "ort"
        self._depths: Dict[Tuple[str, ...], _Depth] = {}
        self.table: Optional[Tuple[LatencyTable, str]] = None  # the table every depth plans from, and its source
        self._times: Dict[str, List[float]] = {}  # plan key -> [dense ms, plan ms], timed side by side
        self._times_path: Optional[Path] = None
        self._is_writer, self._barrier = True, (lambda: None)
        self._dense_onnx: Optional[bytes] = None
        dense = self._depth(())
        self.groups, self.latency = dense.groups, None
        if config.allocate != "global" or self.timed or config.latency_table is not None:
            self.latency = dense.latency = LatencyModel(self.template, self.example, self.groups, *self._rounding)
            self.latency.shapes_needed()  # a multiple too fine for this model is refused now
            # Read (or measured: about a second) before RUN_DIR is touched, so a bad table or an
            # unreachable --target-speedup writes nothing; a resumed run then uses its stored table.
            if config.latency_table is not None:
                self._use_table(read_table(Path(config.latency_table)), f"--latency-table {config.latency_table}")
            else:
                self._use_table(self.source.table(self.latency.shapes_needed(), self.engine, config.latency_threads),
                                f"the table measured on {self.source.describe()}")
        self._check_reachable()

    def _set_table(self, table: LatencyTable, source: str) -> None:
        """Predict from ``table`` from now on, at every depth (the shallower templates' layers are the dense one's)."""
        assert self.latency is not None
        self.latency.use(table, source)
        self.table = (table, source)
        for key, depth in self._depths.items():
            depth.plans.clear()  # predicted fractions from another table no longer hold
            depth.latency = self.latency if not key else None

    def _use_table(self, table: LatencyTable, source: str) -> None:
        """Plan from ``table`` after checking it is one to plan with (see :meth:`_trust`)."""
        self._set_table(table, source)
        if table.engine != self.engine:
            log.warning(f"{source} was measured for engine {table.engine}, the run plans for {self.engine}")
        if self.groups:  # blocks alone choose no widths: a flat table does not matter to them
            self._trust(source)

    def _trust(self, source: str) -> None:
        """Refuse a table that predicts the narrowest network slower than the dense one (inverted: it
        would steer towards wide layers and predict slow-downs); warn once about a flat one (widths
        barely matter in it: the allocation then follows the criterion alone, one notch at a time)."""
        assert self.latency is not None
        dense = self.latency.layers_ms({g.root: g.size for g in self.groups})
        narrow = self.latency.layers_ms(self._floor_widths())
        if narrow > dense:
            raise LatencyTableError(f"{source} predicts the narrowest network slower than the dense one "
                                    f"({narrow:.3g} ms > {dense:.3g} ms): not this model's or this machine's "
                                    f"times; measure it again")
        if narrow > FLAT * dense:
            log.warning(f"{source} is nearly flat (the narrowest network's layers predicted at "
                        f"{narrow / dense:.0%} of the dense ones'): widths are chosen by the criterion alone")

    def _floor_widths(self) -> Dict[str, int]:
        """Every group at the narrowest width its ladder allows."""
        from compressor.prune.latency import ladder

        assert self.latency is not None
        return {g.root: ladder(g, g.size // g.blocks, self.latency.multiple, self.latency.narrowest)[-1] * g.blocks
                for g in self.groups}

    def _depth(self, blocks: Tuple[str, ...]) -> _Depth:
        """The template without ``blocks``, its channel groups and (with a table) its latency model."""
        if blocks not in self._depths:
            template = remove_blocks(copy_model(self.template), self.blocks, blocks) if blocks else self.template
            groups = find_groups(template, self.example, self.config.exclude) if self.config.removes_channels else []
            self._depths[blocks] = _Depth(template, groups)
        depth = self._depths[blocks]
        if depth.latency is None and self.table is not None:
            table, source = self.table
            # its own model: its layers, its groups, and its own node count (count_nodes of its graph)
            latency = LatencyModel(depth.template, self.example, depth.groups, *self._rounding)
            if table.missing(latency.shapes_needed()):
                latency.use(table, source)  # raises, naming what the table lacks
            latency.table = table  # the dense model's checks already ran on this table
            depth.latency = latency
        return depth

    def attach_table(self, root: Path, is_writer: bool, barrier=lambda: None) -> None:
        """For ``--allocate latency``: the run's table, ``root/latency_table.json``. A new run writes
        it there (``--latency-table``'s, or the one measured on this machine); a resumed run reads it back.
        ``barrier`` lets every torchrun rank read what rank 0 wrote (all plan from the same times).
        Timed targets also keep every whole-network time in ``root/latency_measured.json``."""
        self._is_writer, self._barrier = is_writer, barrier
        if self.latency is None:
            return
        path = Path(root) / RUN_DIR_NAME
        if not path.is_file() and is_writer:
            atomic_write_text(path, self.latency.table.to_json())
        barrier()
        self._set_table(read_table(path, "the run's"), str(path))
        if self.timed:
            self._times_path = Path(root) / TIMES_NAME
            self._times = _read_times(self._times_path)
            if is_writer and not self._times_path.is_file():
                self._save_times()
            barrier()
            self._check_reachable()

    @property
    def _rounding(self) -> Tuple[int, Optional[int]]:
        return int(self.rounding["multiple"]), self.rounding["min_channels"]

    def _default_rounding(self) -> Dict[str, Any]:
        """No --channel-multiple: ``DEFAULT_ROUNDING`` (multiples of 16, 8 the narrowest in 16-wide groups; see
        there), or with --quantize int8 ``INT8_ROUNDING`` (16 the narrowest), with the narrowest width the user
        asked for, if any."""
        rounding = default_rounding(self.config.quantize)
        return {**rounding, "min_channels": self.config.min_channels or rounding["min_channels"]}

    def attach_rounding(self, root: Path, is_writer: bool, barrier=lambda: None) -> None:
        """The default rounding a run started with, kept as ``root/rounding.json``: a resumed run (on
        any machine) rounds as the interrupted one did. An explicit --channel-multiple needs no file."""
        if self.config.channel_multiple is not None:
            return
        path = Path(root) / ROUNDING_NAME
        if not path.is_file() and is_writer:
            atomic_write_text(path, json.dumps(self.rounding, indent=1) + "\n")
        barrier()
        stored = _read_rounding(path)
        if (stored["multiple"], stored["min_channels"]) != self._rounding:
            self.rounding = stored
            if self.latency is not None:  # the stored table was measured for the stored rounding's ladders
                table = self.latency.table
                self.latency = LatencyModel(self.template, self.example, self.groups, *self._rounding)
                self.latency.table = table
                for key, depth in self._depths.items():  # every depth's ladders change with the rounding
                    depth.plans.clear()
                    depth.latency = self.latency if not key else None

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
        # a removed block can take its group's root with it: the group lives on under another root, unpruned
        # (block levels come before channel rounds), so a root ``current`` does not know is at full width
        full = full_plan(self._depth(kept.blocks).groups)
        now = {root: current.channels.get(root, full[root]) for root in kept.channels}
        return shrink(model, now, kept.channels, self.example)

    def removed(self, plan: Plan) -> float:
        """Fraction of the dense parameters (or MACs, for --target-macs) that ``plan`` removes; for
        timed targets, the fraction of the predicted latency."""
        depth = self._depth(plan.blocks)
        key = tuple((root, tuple(kept)) for root, kept in sorted(plan.channels.items()))
        if key not in depth.plans:
            if self.timed:
                depth.plans[key] = 1.0 - self._predicted(plan)
            else:
                params, macs = params_and_macs(self.build(plan, None, ""), self.example)
                depth.plans[key] = 1.0 - (macs / self.dense_macs if self.metric == "macs" else params / self.dense_params)
        return depth.plans[key]

    def _predicted_ms(self, plan: Plan) -> float:
        """Predicted milliseconds of ``plan``'s network (its depth's layers and node count)."""
        latency = self._depth(plan.blocks).latency
        assert latency is not None, "a latency table first"
        return latency.predict({root: len(kept) for root, kept in plan.channels.items()})

    def _predicted(self, plan: Plan) -> float:
        """Predicted latency of ``plan``'s network as a fraction of the dense one's."""
        assert self.latency is not None
        return self._predicted_ms(plan) / self.latency.predict({g.root: g.size for g in self.groups})

    def _score(self, plan: Plan) -> float:
        """The predicted figure a timed target is met on, larger is better: the speed-up, or 1 / ms."""
        if self.metric == "latency":
            return 1.0 / self._predicted_ms(plan)
        return 1.0 / self._predicted(plan)

    def _goal(self) -> float:
        return 1.0 / self.target if self.metric == "latency" else self.target

    def measured(self, plan: Plan, confirmed: bool = False) -> float:
        """``plan``'s measured figure (speed-up over the dense network timed alongside, or 1 / ms),
        timed through the run's ``LatencySource`` once and kept in RUN_DIR (so a resumed run, and every
        torchrun rank, sees the same number). ``confirmed``: timed in ``CONFIRM_SESSIONS`` sessions (the
        median pair), the figure a last level is shipped on and records; kept apart from the search's
        one-session figure, so a resumed search takes the same steps."""
        key = _plan_key(plan) + (CONFIRMED if confirmed else "")
        if key not in self._times:
            if self._is_writer:
                self._times[key] = self._time(plan, CONFIRM_SESSIONS if confirmed else SESSIONS)
                self._save_times()
            self._barrier()
            if not self._is_writer:
                self._times = _read_times(self._times_path) if self._times_path else self._times
        dense_ms, plan_ms = self._times[key]
        return 1.0 / plan_ms if self.metric == "latency" else dense_ms / plan_ms

    def _time(self, plan: Plan, sessions: int) -> List[float]:
        """[dense ms, plan ms], the two networks timed side by side (untrained: time does not depend
        on the weights) in ``sessions`` sessions (``side_by_side``), quantized first when the run plans for int8."""
        def exported(model: nn.Module) -> bytes:
            data = network_onnx(model, self.example)
            return quantize_qdq(data) if self.engine == "ort-int8" else data

        if self._dense_onnx is None:
            self._dense_onnx = exported(copy_model(self.template))
        return list(side_by_side(self.source, self._dense_onnx, exported(self.build(plan, None, "")),
                                 self.config.latency_threads, sessions))

    def _save_times(self) -> None:
        if self._times_path is not None and self._is_writer:
            atomic_write_text(self._times_path, json.dumps({"format": "edgeprune-network-times", "version": 1,
                                                            "networks": self._times}, indent=1) + "\n")

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
        round_plan = None
        if not self.config.one_shot:
            have = channel_count(current.channels)
            want = max(1, round(self.config.prune_fraction * have))
            n = smallest(ranking.units, lambda k: have - channel_count(ranking.plan(k)) >= want)
            round_plan = at(ranking.units if n is None else n)
            if channel_count(round_plan.channels) == have:
                raise StructureError(self._unreachable())
            if not self._reaches(round_plan):
                return round_plan, False
        if self.timed:
            return self._timed_last(ranking, at, round_plan), True
        n = smallest(ranking.units, lambda k: self.removed(at(k)) >= self.target)
        if n is None:
            raise StructureError(self._unreachable())
        closest = self._closest(ranking, n, lambda kept: self.removed(Plan(kept, current.blocks)), self.target)
        return Plan(closest, current.blocks), True

    def _reaches(self, plan: Plan) -> bool:
        """Whether ``plan`` meets the target: as measured for a timed target, else as counted."""
        if self.timed:
            return self.measured(plan) >= self._goal()
        return self.removed(plan) >= self.target

    def _block_step(self, model: nn.Module, current: Plan) -> Optional[Tuple[Plan, bool]]:
        """A block level's plan, or None when this level is a channel round (blocks are done: the
        channels alone reach the target from here, or no block is left)."""
        remaining = [b.name for b in self.blocks if b.name not in current.blocks]
        if not remaining or (self.config.removes_channels and self._channels_reach(current.blocks)):
            return None
        assert self.block_criterion is not None
        scores = self.block_criterion.block_scores(model, remaining, self.feed)
        ranked = sorted(remaining, key=lambda name: scores[name])  # stable: ties go in the model's order
        most = len(ranked) if self.config.one_shot else min(self.config.blocks_per_level, len(ranked))
        for count in range(1, most + 1):
            plan = self._without(current, ranked[:count])
            if self._reaches(plan) and (not self.timed or self.measured(plan, confirmed=True) >= self._goal()):
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
        """Whether channel rounds alone can reach the target on the network without ``blocks`` (its
        narrowest network measured, for a timed target: what the last level will be held to)."""
        return self._reaches(self._narrowest(blocks))

    def _closest(self, ranking, n: int, value: Callable[[ChannelPlan], float], goal: float) -> ChannelPlan:
        """``ranking.plan(n)`` (the first plan whose ``value`` reaches ``goal``), or a plan closer to the
        goal built from ``plan(n - 1)`` one group notch at a time (``FILL_STEPS`` at most): rounding one
        wide group a notch can remove several percent at once, another group's notch less."""
        best = ranking.plan(n)
        plan = ranking.plan(n - 1) if n > 0 else None
        for _ in range(FILL_STEPS if plan is not None else 0):
            notched = [p for p in (_one_notch(ranking, plan, g) for g in ranking.groups) if p is not None]
            values = [value(p) for p in notched]
            reaching = [(v, i) for i, v in enumerate(values) if goal <= v < value(best)]
            if reaching:
                return notched[min(reaching)[1]]
            short = [(v, i) for i, v in enumerate(values) if v < goal]
            if not short:
                break
            plan = notched[max(short)[1]]  # the notch that gets nearest without reaching: fill on from it
        return best

    def _timed_last(self, ranking, at: Callable[[int], Plan], round_plan: Optional[Plan]) -> Plan:
        """The last level of a timed target: a bisection over the ranking's plans (``at(k)``) steered
        by the prediction, corrected by measured / predicted of the last network timed: the smallest
        plan measured at the target among at most ``MAX_TRIES`` timed (else the round's plan, measured
        past it, or the narrowest)."""
        goal, correction = self._goal(), 1.0
        low, high = -1, ranking.units + 1  # at(low) measured short of the goal, at(high) reaching it
        if round_plan is not None:
            correction = self.measured(round_plan) / self._score(round_plan)
        for _ in range(MAX_TRIES):
            n = smallest(ranking.units, lambda k: k > low and self._score(at(k)) * correction >= goal)
            if n is None or n >= high:
                n = (low + high) // 2 if high - low > 1 and high <= ranking.units else None
            if n is None or n <= low or n >= high:
                break
            plan = at(n)
            measured = self.measured(plan)
            correction = measured / self._score(plan)
            if measured >= goal:
                high = n
            else:
                low = n
        if high <= ranking.units:
            return self._confirm(ranking, at, high)
        if round_plan is not None:
            self.measured(round_plan, confirmed=True)  # the figure it records
            return round_plan
        narrowest = at(ranking.units)
        if self.measured(narrowest) < goal:
            raise StructureError(self._unreachable())
        self.measured(narrowest, confirmed=True)  # the figure it records
        return narrowest

    def _confirm(self, ranking, at: Callable[[int], Plan], n: int) -> Plan:
        """``at(n)``, measured at the goal in one session, once its ``CONFIRM_SESSIONS`` figure reaches the
        goal too; while that misses (the search read a lucky session), a plan further on, at most
        ``CONFIRM_STEPS``: the first whose prediction corrected by that confirmed figure reaches the goal
        (else the next narrower one). The level ships, and records, the confirmed figure."""
        goal, plan = self._goal(), at(n)
        for _ in range(CONFIRM_STEPS):
            confirmed = self.measured(plan, confirmed=True)
            if confirmed >= goal:
                break
            key, correction = _plan_key(plan), confirmed / self._score(plan)
            further = lambda k, key=key: k > n and _plan_key(at(k)) != key  # noqa: E731
            after = smallest(ranking.units, lambda k: further(k) and self._score(at(k)) * correction >= goal)
            after = after if after is not None else smallest(ranking.units, further)
            if after is None:
                break
            n, plan = after, at(after)
        return plan

    def _ranking(self, depth: _Depth, current: ChannelPlan, scores: Mapping[str, torch.Tensor]):
        """The ``--allocate`` choice's ranking of ``current``'s channels (``units``, ``plan(n)``)."""
        if self.config.allocate == "latency":
            return LatencyRanking(depth.groups, current, scores, depth.latency)
        if self.config.allocate == "global-table":
            return TableRounding(depth.groups, current, scores, depth.latency)
        return Ranking(depth.groups, current, scores, *self._rounding)

    def describe(self, model: nn.Module, plan: Optional[Plan] = None) -> Dict[str, Any]:
        """final.pt's structured figures: params, MACs, their fractions removed, per-layer widths, the
        blocks removed, and with a table the predicted latency (and for timed targets the measured one,
        side by side with the dense network's). ``plan``: the one ``model`` was built for (default: no
        blocks removed)."""
        params, macs = params_and_macs(model, self.example)
        layer_widths = widths(model)
        blocks = plan.blocks if plan is not None else ()
        figures = {"params": params, "macs": macs, "sparsity": 1.0 - params / self.dense_params,
                   "macs_removed": 1.0 - macs / self.dense_macs, "widths": layer_widths,
                   "structure": self.config.structure, "blocks_removed": list(blocks)}
        if self.table is not None:  # a group's width is its root's
            shape = Plan({g.root: range(layer_widths[g.root]) for g in self._depth(blocks).groups}, blocks)
            figures.update(self._prediction(shape))
        return figures

    def _prediction(self, plan: Plan) -> Dict[str, float]:
        """The planner's final prediction for ``plan``: the table's, corrected by the network's measured
        time when it was timed (``predicted_*``: then the confirmed figure, or the search's one-session
        one, which is what the correction makes of the table's prediction), the table's alone as
        ``table_*``, and the measured times (side by side with the dense network: ``side_by_side``)."""
        table_ms, table_speedup = self._predicted_ms(plan), 1.0 / self._predicted(plan)
        figures = {"predicted_ms": table_ms, "predicted_speedup": table_speedup, "table_ms": table_ms,
                   "table_speedup": table_speedup}
        key = _plan_key(plan)
        measured = self._times.get(key + CONFIRMED) or self._times.get(key)
        if measured is not None:
            dense_ms, plan_ms = measured
            figures.update(predicted_ms=plan_ms, predicted_speedup=dense_ms / plan_ms, measured_ms=plan_ms,
                           measured_dense_ms=dense_ms, measured_speedup=dense_ms / plan_ms)
        return figures

    def blocks_removed(self, plan: Plan) -> Dict[str, List[str]]:
        """For latency and node counting: each block ``plan`` removes and the Conv/Linear layers that go with it."""
        return {b.name: list(b.layers) for b in self.blocks if b.name in plan.blocks}

    def _smallest(self) -> Plan:
        """The smallest network the run may build: every removable block gone, every group at its narrowest."""
        blocks = tuple(b.name for b in self.blocks)
        return self._narrowest(blocks) if self.config.removes_channels else Plan({}, blocks)

    def _check_reachable(self) -> None:
        """Refuse, before anything is trained, a target that even the smallest network misses (by the
        table, for a timed target: whole networks are timed only once levels are planned)."""
        plan = self._smallest()
        if self.timed:
            if self._score(plan) < self._goal():
                raise ConfigError(self._unreachable())
        elif self.removed(plan) < self.target:
            raise ConfigError(self._unreachable())

    def _unreachable(self) -> str:
        plan = self._smallest()
        multiple, floor = self._rounding[0], self._rounding[1] or self._rounding[0]
        wide = floor < multiple and self.config.allocate == "global"  # channels.floor_width
        narrowest = f"{floor} channels" + (f" ({multiple} in groups wider than {multiple})" if wide else "")
        parts = ([f"every prunable group down to {narrowest}"] if self.config.removes_channels else []) + \
                ([f"all {len(self.blocks)} removable blocks removed"] if self.blocks else [])
        smallest_net = " and ".join(parts)
        hint = ", the multiple or the --exclude list" if self.config.removes_channels else \
            " or add channels: --structure channels,blocks"
        if self.config.removes_channels and not self.config.removes_blocks:  # e.g. int8's narrowest 16
            hint += ", or remove residual blocks too: --structure channels,blocks"
        if self.metric == "speedup":
            return (f"--target-speedup {self.target:g} is out of reach: with {smallest_net} the table predicts "
                    f"{self._score(plan):.2f}x; lower the target{hint}")
        if self.metric == "latency":
            return (f"--target-latency {self.target:g} is out of reach: with {smallest_net} the table predicts "
                    f"{1.0 / self._score(plan):.3g} ms; raise the target{hint}")
        most = self.removed(plan)
        flag = "--target-macs" if self.metric == "macs" else "--target-sparsity"
        return (f"{flag} {self.target:g} is out of reach: with {smallest_net} at most {most:.1%} of the "
                f"{'MACs' if self.metric == 'macs' else 'parameters'} go; lower the target{hint}")


def _plan_key(plan: Plan) -> str:
    """A plan's widths (and removed blocks) as one line: what a network's time depends on, not which channels."""
    key = _widths_key(plan.channels)
    return key + ("|-" + ",".join(plan.blocks) if plan.blocks else "")


def _widths_key(plan: Mapping[str, Sequence[int]]) -> str:
    """A plan's widths as one line (what a network's time depends on, not which channels)."""
    return ",".join(f"{root}:{len(kept)}" for root, kept in sorted(plan.items()))


def _one_notch(ranking, plan: ChannelPlan, g: Group) -> Optional[ChannelPlan]:
    """``plan`` with group ``g`` one rounding notch narrower (its strongest units kept), or None at its floor."""
    from compressor.prune.latency import ladder

    current = ranking.current[g.root]
    units_now = len(plan[g.root]) // g.blocks
    floor = getattr(ranking, "floor", None)  # the global ranking's rule (channels.floor_width), else the table's
    narrowest = floor(g) if floor is not None else ranking.latency.narrowest
    multiple = getattr(ranking, "multiple", None) or ranking.latency.multiple
    lower = [u for u in ladder(g, len(current) // g.blocks, multiple, narrowest) if u < units_now]
    if not lower:
        return None
    units = len(current) // g.blocks
    strongest = torch.sort(ranking.unit_scores[g.root], descending=True, stable=True).indices[:lower[0]]
    positions = sorted(int(p) for p in strongest)
    return {**plan, g.root: sorted(current[b * units + p] for b in range(g.blocks) for p in positions)}


def _read_times(path: Path) -> Dict[str, List[float]]:
    """RUN_DIR/latency_measured.json's networks (absent: none yet); a malformed file is one error line."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_bounded(path, 16 * 1024 * 1024).decode("utf-8"))
        networks = data["networks"]
        if not isinstance(networks, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2 and
                all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1e7 for t in v)
                for k, v in networks.items()):
            raise ValueError("malformed")
        return {k: [float(t) for t in v] for k, v in networks.items()}
    except (OSError, ModelDirError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise LatencyTableError(f"{path}: not this run's network times ({str(error)[:80]})") from None


def _read_rounding(path: Path) -> Dict[str, Any]:
    """RUN_DIR/rounding.json, checked (a RUN_DIR may come from elsewhere)."""
    try:
        data = json.loads(read_bounded(path, 1 << 20).decode("utf-8"))
        multiple, narrowest = data["multiple"], data["min_channels"]
        if not (isinstance(multiple, int) and 1 <= multiple <= 1024) or not (
                narrowest is None or (isinstance(narrowest, int) and 1 <= narrowest <= multiple)):
            raise ValueError("unknown rounding")
        return {"multiple": multiple, "min_channels": narrowest}
    except (OSError, ModelDirError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise LatencyTableError(f"{path}: not this run's rounding ({str(error)[:80]})") from None
