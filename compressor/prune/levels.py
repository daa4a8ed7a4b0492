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

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from compressor import checkpoints
from compressor.prune.channels import (ChannelPlan, Example, Group, Ranking, channel_count, copy_model,
                                       example_input, find_groups, full_plan, group_scores, params_and_macs, shrink,
                                       smallest, widths)
from compressor.prune.allocation import LatencyRanking, TableRounding
from compressor.config import PruneConfig
from compressor.prune.criteria import ChannelCriterion
from compressor.errors import ConfigError, StructureError
from compressor.prune.latency import (DEFAULT_ROUNDING, RUN_DIR_NAME, LatencyModel, LatencySource, LocalLatency,
                                      network_onnx, quantize_qdq)
from edge_runtime.errors import ModelDirError
from edge_runtime.layer_timing import LatencyTableError, read_table
from edge_runtime.safe_io import atomic_write_text, read_bounded

log = logging.getLogger("compressor")
ROUNDING_NAME = "rounding.json"  # the default rounding a run measured, so --resume rounds the same
TIMES_NAME = "latency_measured.json"  # whole-network times the run planned with, so --resume plans the same
MAX_TRIES = 8  # candidate networks timed per last level (a bisection: 8 narrow hundreds of plans well)
FILL_STEPS = 3  # notches the last level may add to the plan before the target to land closer to it
FLAT = 0.9  # a table predicting the narrowest network's layers at over 90% of the dense ones' is flat


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


class ChannelLevels:
    """The structured side of one run (see the module docstring)."""

    def __init__(self, template: nn.Module, input_shape: Optional[Sequence[int]], config: PruneConfig,
                 criterion: ChannelCriterion, source: Optional[LatencySource] = None,
                 example: Optional[Example] = None) -> None:
        """Traces ``template`` on ``example`` (one example of the data; default: seeded noise of
        ``input_shape``); ``source`` measures latency (default: this machine)."""
        self.template = copy_model(template).cpu()
        if example is None and not input_shape:
            raise ConfigError("--structure channels needs example inputs: data to trace with, or the model's "
                              "input shape (model.input_shape)")
        self.example = example if example is not None else example_input(input_shape)
        self.config, self.criterion = config, criterion
        self.groups = find_groups(self.template, self.example, config.exclude)
        self.dense_params, self.dense_macs = params_and_macs(self.template, self.example)
        self.metric, self.target = _target(config)
        self.source: LatencySource = source or LocalLatency()
        self.rounding = self._default_rounding() if config.channel_multiple is None else \
            {"multiple": config.channel_multiple, "min_channels": config.min_channels}
        self.timed = self.metric in ("speedup", "latency")  # met as measured: candidates are timed
        self.engine = "ort-int8" if config.quantize == "int8" else "ort"
        self._cache: Dict[Tuple[Tuple[str, Tuple[int, ...]], ...], float] = {}
        self._times: Dict[str, List[float]] = {}  # widths key -> [dense ms, plan ms], timed side by side
        self._times_path: Optional[Path] = None
        self._is_writer, self._barrier = True, (lambda: None)
        self._dense_onnx: Optional[bytes] = None
        self.latency: Optional[LatencyModel] = None
        if config.allocate != "global" or self.timed:
            self.latency = LatencyModel(self.template, self.example, self.groups, *self._rounding)
            self.latency.shapes_needed()  # a multiple too fine for this model is refused now
            # Read (or measured: about a second) before RUN_DIR is touched, so a bad table or an
            # unreachable --target-speedup writes nothing; a resumed run then uses its stored table.
            if config.latency_table is not None:
                self._use_table(read_table(Path(config.latency_table)), f"--latency-table {config.latency_table}")
            else:
                self._use_table(self.source.table(self.latency.shapes_needed(), self.engine, config.latency_threads),
                                f"the table measured on {self.source.describe()}")
        self._check_reachable()

    def _use_table(self, table, source: str) -> None:
        """Plan from ``table`` after checking it is one to plan with (see :meth:`_trust`)."""
        assert self.latency is not None
        self.latency.use(table, source)
        if table.engine != self.engine:
            log.warning(f"{source} was measured for engine {table.engine}, the run plans for {self.engine}")
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
        self.latency.use(read_table(path, "the run's"), str(path))
        self._cache.clear()  # predicted fractions from the table measured at start no longer hold
        if self.timed:
            self._times_path = Path(root) / TIMES_NAME
            self._times = _read_times(self._times_path)
            if is_writer and not self._times_path.is_file():
                self._save_times()
            barrier()
        if self.metric in ("speedup", "latency"):
            self._check_reachable()

    @property
    def _rounding(self) -> Tuple[int, Optional[int]]:
        return int(self.rounding["multiple"]), self.rounding["min_channels"]

    def _default_rounding(self) -> Dict[str, Any]:
        """No --channel-multiple: ``DEFAULT_ROUNDING`` (multiples of 16, 8 as the narrowest; see there),
        with the narrowest width the user asked for, if any."""
        return {**DEFAULT_ROUNDING, "min_channels": self.config.min_channels or DEFAULT_ROUNDING["min_channels"]}

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
        """Fraction of the dense parameters (or MACs, for --target-macs) that ``plan`` removes; for
        timed targets, the fraction of the predicted latency."""
        key = tuple((root, tuple(kept)) for root, kept in sorted(plan.items()))
        if key not in self._cache:
            if self.timed:
                self._cache[key] = 1.0 - self._predicted({root: len(kept) for root, kept in plan.items()})
            else:
                params, macs = params_and_macs(self.build(plan, None, ""), self.example)
                self._cache[key] = 1.0 - (macs / self.dense_macs if self.metric == "macs" else params / self.dense_params)
        return self._cache[key]

    def _predicted(self, group_widths: Mapping[str, int]) -> float:
        """Predicted latency of a network with these group widths, as a fraction of the dense one's."""
        assert self.latency is not None
        return self.latency.predict(group_widths) / self.latency.predict({g.root: g.size for g in self.groups})

    def _score(self, plan: Mapping[str, Sequence[int]]) -> float:
        """The predicted figure a timed target is met on, larger is better: the speed-up, or 1 / ms."""
        assert self.latency is not None
        if self.metric == "latency":
            return 1.0 / self.latency.predict({root: len(kept) for root, kept in plan.items()})
        return 1.0 / self._predicted({root: len(kept) for root, kept in plan.items()})

    def _goal(self) -> float:
        return 1.0 / self.target if self.metric == "latency" else self.target

    def measured(self, plan: Mapping[str, Sequence[int]]) -> float:
        """``plan``'s measured figure (speed-up over the dense network timed alongside, or 1 / ms),
        timed through the run's ``LatencySource`` once and kept in RUN_DIR (so a resumed run, and every
        torchrun rank, sees the same number)."""
        key = _widths_key(plan)
        if key not in self._times:
            if self._is_writer:
                self._times[key] = self._time(plan)
                self._save_times()
            self._barrier()
            if not self._is_writer:
                self._times = _read_times(self._times_path) if self._times_path else self._times
        dense_ms, plan_ms = self._times[key]
        return 1.0 / plan_ms if self.metric == "latency" else dense_ms / plan_ms

    def _time(self, plan: Mapping[str, Sequence[int]]) -> List[float]:
        """[dense ms, plan ms], the two networks timed side by side (untrained: time does not depend
        on the weights), quantized first when the run plans for int8."""
        def exported(model: nn.Module) -> bytes:
            data = network_onnx(model, self.example)
            return quantize_qdq(data) if self.engine == "ort-int8" else data

        if self._dense_onnx is None:
            self._dense_onnx = exported(copy_model(self.template))
        times = self.source.time_networks([self._dense_onnx, exported(self.build(plan, None, ""))],
                                          self.config.latency_threads)
        if len(times) != 2 or not all(isinstance(t, float) and 0.0 < t < 1e7 for t in times):
            raise LatencyTableError(f"{self.source.describe()} returned no usable network times ({str(times)[:80]})")
        return [float(t) for t in times]

    def _save_times(self) -> None:
        if self._times_path is not None and self._is_writer:
            atomic_write_text(self._times_path, json.dumps({"format": "edgeprune-network-times", "version": 1,
                                                            "networks": self._times}, indent=1) + "\n")

    def next_plan(self, model: nn.Module, current: ChannelPlan) -> Tuple[ChannelPlan, bool]:
        """The next level's plan from ``model`` (the previous level, trained) and whether it is the last."""
        scores = group_scores(model, self.groups, current, self.criterion, self.example)
        ranking = self._ranking(current, scores)
        round_plan = None
        if not self.config.one_shot:
            have = channel_count(current)
            want = max(1, round(self.config.prune_fraction * have))
            n = smallest(ranking.units, lambda k: have - channel_count(ranking.plan(k)) >= want)
            round_plan = ranking.plan(ranking.units if n is None else n)
            if channel_count(round_plan) == have:
                raise StructureError(self._unreachable())
            if not self._reaches(round_plan):
                return round_plan, False
        if self.timed:
            return self._timed_last(ranking, round_plan), True
        n = smallest(ranking.units, lambda k: self.removed(ranking.plan(k)) >= self.target)
        if n is None:
            raise StructureError(self._unreachable())
        return self._closest(ranking, n, lambda plan: self.removed(plan), self.target), True

    def _reaches(self, plan: ChannelPlan) -> bool:
        if self.timed:
            return self.measured(plan) >= self._goal()
        return self.removed(plan) >= self.target

    def _closest(self, ranking, n: int, value: Callable[[ChannelPlan], float], goal: float) -> ChannelPlan:
        """``ranking.plan(n)`` (the first plan whose ``value`` reaches ``goal``), or a plan closer to the
        goal built from ``plan(n - 1)`` one group notch at a time (``FILL_STEPS`` at most): rounding one
        wide group a notch can remove several percent at once, another group's notch less."""
        best = ranking.plan(n)
        plan = ranking.plan(n - 1) if n > 0 else None
        for _ in range(FILL_STEPS if plan is not None else 0):
            notched = [p for p in (_one_notch(ranking, plan, g) for g in self.groups) if p is not None]
            values = [value(p) for p in notched]
            reaching = [(v, i) for i, v in enumerate(values) if goal <= v < value(best)]
            if reaching:
                return notched[min(reaching)[1]]
            short = [(v, i) for i, v in enumerate(values) if v < goal]
            if not short:
                break
            plan = notched[max(short)[1]]  # the notch that gets nearest without reaching: fill on from it
        return best

    def _timed_last(self, ranking, round_plan: Optional[ChannelPlan]) -> ChannelPlan:
        """The last level of a timed target: a bisection over the ranking's plans steered by the
        prediction, corrected by measured / predicted of the last network timed: the smallest plan
        measured at the target among at most ``MAX_TRIES`` timed (else the round's plan, measured
        past it, or the narrowest)."""
        goal, correction = self._goal(), 1.0
        low, high = -1, ranking.units + 1  # plan(low) measured short of the goal, plan(high) reaching it
        if round_plan is not None:
            correction = self.measured(round_plan) / self._score(round_plan)
        for _ in range(MAX_TRIES):
            n = smallest(ranking.units, lambda k: k > low and self._score(ranking.plan(k)) * correction >= goal)
            if n is None or n >= high:
                n = (low + high) // 2 if high - low > 1 and high <= ranking.units else None
            if n is None or n <= low or n >= high:
                break
            plan = ranking.plan(n)
            measured = self.measured(plan)
            correction = measured / self._score(plan)
            if measured >= goal:
                high = n
            else:
                low = n
        if high <= ranking.units:
            return ranking.plan(high)
        if round_plan is not None:
            return round_plan
        narrowest = ranking.plan(ranking.units)
        if self.measured(narrowest) < goal:
            raise StructureError(self._unreachable())
        return narrowest

    def _ranking(self, current: ChannelPlan, scores: Mapping[str, torch.Tensor]):
        """The ``--allocate`` choice's ranking of ``current``'s channels (``units``, ``plan(n)``)."""
        if self.config.allocate == "latency":
            return LatencyRanking(self.groups, current, scores, self.latency)
        if self.config.allocate == "global-table":
            return TableRounding(self.groups, current, scores, self.latency)
        return Ranking(self.groups, current, scores, *self._rounding)

    def describe(self, model: nn.Module) -> Dict[str, Any]:
        """final.pt's structured figures: params, MACs, their fractions removed, per-layer widths, and
        with a table the predicted latency (and for timed targets the measured one, side by side with
        the dense network's)."""
        params, macs = params_and_macs(model, self.example)
        layer_widths = widths(model)
        figures = {"params": params, "macs": macs, "sparsity": 1.0 - params / self.dense_params,
                   "macs_removed": 1.0 - macs / self.dense_macs, "widths": layer_widths, "structure": "channels"}
        if self.latency is not None and self.latency.table is not None:  # a group's width is its root's
            group_widths = {g.root: layer_widths[g.root] for g in self.groups}
            figures["predicted_ms"] = self.latency.predict(group_widths)
            figures["predicted_speedup"] = 1.0 / self._predicted(group_widths)
            measured = self._times.get(_widths_key({root: range(w) for root, w in group_widths.items()}))
            if measured is not None:
                figures.update(measured_ms=measured[1], measured_dense_ms=measured[0],
                               measured_speedup=measured[0] / measured[1])
        return figures

    def _check_reachable(self) -> None:
        """Refuse, before anything is trained, a target that even the narrowest network misses (by
        the table; a timed target also by timing the narrowest network once)."""
        uniform = {g.root: torch.zeros(g.size) for g in self.groups}
        narrowest = self._ranking(self.dense_plan(), uniform)
        plan = narrowest.plan(narrowest.units)
        if self.timed:
            if self._score(plan) < self._goal():
                raise ConfigError(self._unreachable())
        elif self.removed(plan) < self.target:
            raise ConfigError(self._unreachable())

    def _unreachable(self) -> str:
        uniform = {g.root: torch.zeros(g.size) for g in self.groups}
        narrowest = self._ranking(self.dense_plan(), uniform)
        plan = narrowest.plan(narrowest.units)
        floor = self._rounding[1] or self._rounding[0]
        if self.metric == "speedup":
            return (f"--target-speedup {self.target:g} is out of reach: with every prunable group "
                    f"down to {floor} channels the table predicts {self._score(plan):.2f}x; lower the target, "
                    f"the multiple or the --exclude list")
        if self.metric == "latency":
            return (f"--target-latency {self.target:g} is out of reach: with every prunable group down to {floor} "
                    f"channels the table predicts {1.0 / self._score(plan):.3g} ms; raise the target, lower the "
                    f"multiple or the --exclude list")
        most = self.removed(plan)
        flag = "--target-macs" if self.metric == "macs" else "--target-sparsity"
        return (f"{flag} {self.target:g} is out of reach: with every prunable group down to "
                f"{floor} channels at most {most:.1%} of the "
                f"{'MACs' if self.metric == 'macs' else 'parameters'} go; lower the target, the multiple "
                f"or the --exclude list")


def _widths_key(plan: Mapping[str, Sequence[int]]) -> str:
    """A plan's widths as one line (what a network's time depends on, not which channels)."""
    return ",".join(f"{root}:{len(kept)}" for root, kept in sorted(plan.items()))


def _one_notch(ranking, plan: ChannelPlan, g: Group) -> Optional[ChannelPlan]:
    """``plan`` with group ``g`` one rounding notch narrower (its strongest units kept), or None at its floor."""
    from compressor.prune.latency import ladder

    current = ranking.current[g.root]
    units_now = len(plan[g.root]) // g.blocks
    narrowest = getattr(ranking, "narrowest", None) or ranking.latency.narrowest
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
