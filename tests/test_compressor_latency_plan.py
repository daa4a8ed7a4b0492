"""Planning with latency: the predictor's fixed costs, timed targets met as measured (through a stub
device whose network times are known), MAC targets not overshot, untrustworthy tables refused or warned,
the default rounding chosen from a profile, and a resumed plan read back rather than re-timed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.config import PruneConfig
from compressor.prune.channels import find_groups
from compressor.prune.examples import example_input
from compressor.prune.criteria import criterion_named
from compressor.prune.latency import LatencyModel, count_nodes, network_onnx
from compressor.prune.levels import TIMES_NAME, ChannelLevels
from compressor.train.models import build_model, input_shape_of
from edge_runtime.layer_timing import LatencyTable, LatencyTableError, LayerShape


def _macs_like(shape: LayerShape) -> float:
    area = int(np.prod(shape.spatial)) if shape.spatial else 1
    return 1e-6 * shape.cin * shape.cout * area + 1e-3


class StubDevice:
    """A LatencySource whose times are arithmetic: tables from ``ms``, a network's time from its
    weights' sizes (not what the table predicts: the planner must correct itself by measuring)."""

    def __init__(self, ms=_macs_like, call_ms: float = 0.05, node_ms: float = 0.002) -> None:
        self.ms, self.call_ms, self.node_ms, self.timed = ms, call_ms, node_ms, 0

    def describe(self) -> str:
        return "a stub device"

    def table(self, shapes: Sequence[LayerShape], engine: str, threads: int) -> LatencyTable:
        return LatencyTable({s.key(): self.ms(s) for s in shapes}, threads, "stub", engine, self.call_ms, self.node_ms)

    def time_networks(self, models: Sequence[bytes], threads: int) -> List[float]:
        self.timed += len(models)
        return [0.1 + 2e-5 * sum(numpy_helper.to_array(t).size for t in onnx.load_from_string(m).graph.initializer)
                for m in models]


class NoDevice(StubDevice):
    def time_networks(self, models, threads):
        raise AssertionError("a resumed run must not time networks again")


def _levels(tmp_path: Path, source, **config) -> ChannelLevels:
    torch.manual_seed(0)
    model = build_model(config.pop("model", "resnet20"))
    levels = ChannelLevels(model, input_shape_of(model), PruneConfig(structure="channels", one_shot=True,
                                                                     channel_multiple=8, **config),
                           criterion_named(None, "channels"), source)
    levels.attach_rounding(tmp_path, True)
    levels.attach_table(tmp_path, True)
    return levels


def test_the_predictor_adds_one_calls_and_every_nodes_fixed_cost() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    example = example_input(input_shape_of(model))
    groups = find_groups(model, example)
    latency = LatencyModel(model, example, groups, 8)
    ops = [n.op_type for n in onnx.load_from_string(network_onnx(model, example)).graph.node]
    # 19 Relu, 9 Add, 1 GlobalAveragePool; Conv/Gemm are the table's, Identity/Flatten cost nothing
    assert count_nodes(network_onnx(model, example)) == 29 == len([o for o in ops if o in ("Relu", "Add",
                                                                                            "GlobalAveragePool")])
    table = StubDevice(call_ms=0.5, node_ms=0.01).table(latency.shapes_needed(), "ort", 1)
    latency.use(table, "stub")
    dense = {g.root: g.size for g in groups}
    layers = sum(_macs_like(layer.dense) for layer in latency.layers)
    assert latency.layers_ms(dense) == pytest.approx(layers)
    assert latency.predict(dense) == pytest.approx(0.5 + layers + 0.01 * 29)
    assert latency.predict(dense, nodes=10) == pytest.approx(0.5 + layers + 0.1)


@pytest.mark.parametrize("allocate", ["global", "latency"])
def test_a_mac_target_is_not_overshot_even_with_a_flat_table(tmp_path: Path, allocate: str, caplog) -> None:
    flat = StubDevice(ms=lambda s: 1.0)
    if allocate == "latency":  # a table that cannot tell widths apart is refused in one line (check_for_planning)
        with pytest.raises(LatencyTableError, match="is flat") as error:
            _levels(tmp_path, flat, allocate=allocate, target_macs=0.5)
        assert "\n" not in str(error.value)
        # barely sloped (a few percent from the narrowest to the widest): planned with, one warning line
        flat = StubDevice(ms=lambda s: 1.0 + 0.2 * _macs_like(s))
    with caplog.at_level(logging.WARNING, logger="compressor"):
        levels = _levels(tmp_path, flat, allocate=allocate, target_macs=0.5)
    assert allocate == "global" or "nearly flat" in caplog.text
    model = levels.build(levels.dense_plan(), None, "")
    plan, last = levels.next_plan(model, levels.dense_plan())
    # one notch of one group is the granularity: a few percent of resnet20's MACs, never a round's 20%
    assert last and 0.5 <= levels.removed(plan) < 0.55, levels.removed(plan)


def test_an_inverted_table_is_refused_in_one_line(tmp_path: Path) -> None:
    inverted = StubDevice(ms=lambda s: 1.0 / _macs_like(s))
    with pytest.raises(LatencyTableError, match="inverted|slower than the dense one") as error:
        _levels(tmp_path, inverted, allocate="latency", target_macs=0.5)
    assert "\n" not in str(error.value)


def test_target_speedup_is_met_as_measured_and_a_resumed_run_replans_from_the_stored_times(tmp_path: Path) -> None:
    device = StubDevice()
    levels = _levels(tmp_path, device, allocate="latency", target_speedup=2.0)
    model = levels.build(levels.dense_plan(), None, "")
    plan, last = levels.next_plan(model, levels.dense_plan())
    assert last and device.timed >= 2
    figures = levels.describe(levels.build(plan, None, ""))
    assert figures["measured_speedup"] >= 2.0 and figures["predicted_ms"] > 0
    assert figures["measured_speedup"] < 2.0 * 1.25  # stops near the target, not a round past it
    assert (tmp_path / TIMES_NAME).is_file()
    again = _levels(tmp_path, NoDevice(), allocate="latency", target_speedup=2.0)
    assert again.next_plan(model, again.dense_plan()) == (plan, True)


def test_target_latency_is_milliseconds_as_measured(tmp_path: Path) -> None:
    device = StubDevice()
    dense_ms = device.time_networks([network_onnx(build_model("resnet20").eval(),
                                                  example_input((3, 32, 32)))], 1)[0]
    levels = _levels(tmp_path, device, allocate="latency", target_latency=dense_ms / 1.8)
    plan, _ = levels.next_plan(levels.build(levels.dense_plan(), None, ""), levels.dense_plan())
    assert levels.describe(levels.build(plan, None, ""))["measured_ms"] <= dense_ms / 1.8


def test_the_default_rounding_is_16_with_8_narrowest_and_a_run_keeps_its_own(tmp_path: Path) -> None:
    """No --channel-multiple: multiples of 16, 8 as the narrowest (DEFAULT_ROUNDING); the rounding a run
    started with is kept in RUN_DIR/rounding.json and wins on --resume, should the default change."""
    import json

    torch.manual_seed(0)
    model = build_model("digits-cnn")
    config = PruneConfig(structure="channels", target_macs=0.5)
    levels = ChannelLevels(model, input_shape_of(model), config, criterion_named(None, "channels"), StubDevice())
    assert levels._rounding == (16, 8)
    (tmp_path / "run").mkdir()
    levels.attach_rounding(tmp_path / "run", True)
    assert json.loads((tmp_path / "run" / "rounding.json").read_text()) == {"multiple": 16, "min_channels": 8}
    (tmp_path / "run" / "rounding.json").write_text(json.dumps({"multiple": 8, "min_channels": None}))
    resumed = ChannelLevels(model, input_shape_of(model), config, criterion_named(None, "channels"), StubDevice())
    resumed.attach_rounding(tmp_path / "run", True)
    assert resumed._rounding == (8, None)



def test_planning_for_int8_rounds_to_16_at_the_narrowest_and_names_blocks_when_channels_fall_short() -> None:
    """--quantize int8 without --channel-multiple: multiples of 16, none narrower (int8 kernels run 8
    channels no faster than 16); the user's --min-channels still wins. resnet20's first stage is 16 wide,
    so 70% of its MACs is out of reach for channels alone: refused in one line that names blocks."""
    model = build_model("resnet20")

    def rounding(**config):
        return ChannelLevels(model, input_shape_of(model), PruneConfig(structure="channels", target_macs=0.5,
                                                                       **config),
                             criterion_named(None, "channels"), StubDevice())._rounding

    assert rounding() == (16, 8) and rounding(quantize="int8") == (16, 16)
    assert rounding(quantize="int8", min_channels=8) == (16, 8) and rounding(quantize="int8", channel_multiple=8) == (8, None)
    with pytest.raises(Exception, match="out of reach.*16 channels.*--structure channels,blocks") as error:
        ChannelLevels(model, input_shape_of(model), PruneConfig(structure="channels", target_macs=0.7, quantize="int8"),
                      criterion_named(None, "channels"), StubDevice())
    assert "\n" not in str(error.value)


class _TwoInputs(torch.nn.Module):
    """An image through two convs, plus a side vector through a Linear: ``model(image, side)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 48, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(48, 48, 3, padding=1)
        self.side = torch.nn.Linear(5, 48)
        self.fc = torch.nn.Linear(48, 4)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv2(torch.relu(self.conv1(image)))).mean((2, 3))
        return self.fc(features + self.side(side))


def _two_inputs(size: int = 8):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, size, size, generator=generator), torch.randn(1, 5, generator=generator)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_a_several_input_example_exports_a_graph_onnxruntime_runs_with_those_inputs(form: str) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _TwoInputs().eval()
    image, side = _two_inputs()
    # a dict in another order than forward's parameters: names still go with their tensors
    example = (image, side) if form == "tuple" else {"side": side, "image": image}
    session = ort.InferenceSession(network_onnx(model, example), providers=["CPUExecutionProvider"])
    names = ["input_0", "input_1"] if form == "tuple" else ["image", "side"]
    assert [(i.name, i.shape) for i in session.get_inputs()] == [(names[0], [1, 3, 8, 8]), (names[1], [1, 5])]
    got = session.run(None, {names[0]: image.numpy(), names[1]: side.numpy()})[0]
    np.testing.assert_allclose(got, model(image, side).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert model.training is False


def test_target_speedup_plans_a_two_input_model_timed_on_this_machine(tmp_path: Path) -> None:
    """A timed target with a tuple example: the candidates are exported with both inputs and timed by
    onnxruntime here (LocalLatency: real sessions), and the plan is met as measured."""
    from compressor.prune.latency import LocalLatency

    torch.manual_seed(0)
    model = _TwoInputs()
    image, side = _two_inputs(24)
    levels = ChannelLevels(model, None, PruneConfig(structure="channels", one_shot=True, channel_multiple=16,
                                                    allocate="latency", target_speedup=1.2, exclude=("fc",)),
                           criterion_named(None, "channels"), LocalLatency(rounds=2, runs=5), example=(image, side))
    levels.attach_rounding(tmp_path, True)
    levels.attach_table(tmp_path, True)
    plan, last = levels.next_plan(levels.build(levels.dense_plan(), None, ""), levels.dense_plan())
    pruned = levels.build(plan, None, "")
    figures = levels.describe(pruned)
    assert last and figures["macs_removed"] > 0 and figures["measured_speedup"] >= 1.2
    assert pruned(image, side).shape == (1, 4)


def test_the_default_narrowest_width_is_for_groups_no_wider_than_the_multiple(tmp_path: Path) -> None:
    """A conv with 8 outputs runs at half the MAC rate of one with 16: by default only resnet20's 16-wide
    groups may keep 8; its 32- and 64-wide ones keep 16 or more, and 70% of the MACs is still met, not
    overshot. An explicit --channel-multiple 8 keeps 8 everywhere; a table's allocation decides for itself."""
    from compressor.prune.channels import floor_width
    from compressor.prune.latency import ladder

    torch.manual_seed(0)
    model = build_model("resnet20")
    levels = ChannelLevels(model, input_shape_of(model), PruneConfig(structure="channels", target_macs=0.7,
                                                                     one_shot=True),
                           criterion_named(None, "channels"), StubDevice())
    sizes = {g.root: g.size for g in levels.groups}
    assert set(sizes.values()) == {16, 32, 64}
    for g in levels.groups:
        assert floor_width(g, 16, 8) == (8 if g.size == 16 else 16) and floor_width(g, 8, 8) == 8
        assert ladder(g, g.size, 16, 8)[-1] == 8  # a table's allocations (latency, global-table) may go to 8
    plan, last = levels.next_plan(levels.build(levels.dense_plan(), None, ""), levels.dense_plan())
    widths = {root: len(kept) for root, kept in plan.channels.items()}
    assert last and 0.7 <= levels.removed(plan) < 0.73
    assert all(w >= 16 for root, w in widths.items() if sizes[root] > 16) and 8 in widths.values()
    assert all(w % 16 == 0 or w == 8 for w in widths.values())


class LuckyFirstSession(StubDevice):
    """Each network's first timing session reads it 15% faster than every later one (a quiet moment):
    the search's one-session figures flatter, the shipped level's confirmation sessions do not."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def time_networks(self, models: Sequence[bytes], threads: int) -> List[float]:
        times = super().time_networks(models, threads)
        key = models[1]
        lucky = key not in self.seen
        self.seen.add(key)
        return [times[0], times[1] * (0.85 if lucky else 1.0)]


def test_the_shipped_level_is_confirmed_in_more_sessions_and_records_that_prediction(tmp_path: Path) -> None:
    """The search reads one session per candidate; the plan it ships is timed again in CONFIRM_SESSIONS
    sessions beside the dense network and, where that misses the goal, the level goes further. The
    prediction it records is the planner's final one (the table's corrected by that measured ratio), kept
    apart from the table's own; the study's measured speed-up is the same function."""
    from compressor.prune.latency import CONFIRM_SESSIONS

    device = LuckyFirstSession()
    levels = _levels(tmp_path, device, allocate="latency", target_speedup=2.0)
    plan, last = levels.next_plan(levels.build(levels.dense_plan(), None, ""), levels.dense_plan())
    confirmed = levels.measured(plan, confirmed=True)
    assert last and confirmed >= 2.0 and levels.measured(plan) > confirmed  # lucky search figure, honest confirmation
    figures = levels.describe(levels.build(plan, None, ""))
    assert figures["predicted_speedup"] == figures["measured_speedup"] == pytest.approx(confirmed)
    assert figures["table_speedup"] != figures["predicted_speedup"] and figures["table_ms"] > 0
    # the search's own pick was read lucky and confirmed short: the shipped plan lies further on
    stored = levels._times
    searched = [k for k in stored if not k.endswith("|confirmed") and stored[k][0] / stored[k][1] >= 2.0]
    assert any(stored[k + "|confirmed"][0] / stored[k + "|confirmed"][1] < 2.0 for k in searched
               if k + "|confirmed" in stored)
    assert CONFIRM_SESSIONS >= 3
    import benchmarks.studies.prune_to_device as study
    from compressor.prune import latency

    assert study.side_by_side is latency.side_by_side  # the study measures as the planner does


def test_side_by_side_is_the_median_session_pair() -> None:
    from compressor.prune.latency import side_by_side

    class Sessions(StubDevice):
        def __init__(self, pairs) -> None:
            super().__init__()
            self.pairs = iter(pairs)

        def time_networks(self, models, threads):
            return list(next(self.pairs))

    assert side_by_side(Sessions([(2.0, 1.0), (9.0, 1.0), (2.4, 1.2)]), b"", b"", 1) == (2.4, 1.2)
    assert side_by_side(Sessions([(3.0, 1.0)]), b"", b"", 1, sessions=1) == (3.0, 1.0)
    with pytest.raises(LatencyTableError, match="no usable network times"):
        side_by_side(Sessions([(float("nan"), 1.0)]), b"", b"", 1)


def test_network_times_are_a_low_quantile_that_preempted_runs_do_not_move(monkeypatch) -> None:
    """time_networks' statistic on a scripted clock: a network whose runs are preempted a third of the
    time (10x as long) reads as its typical run, not as the preemptions, so ratios between networks hold."""
    from edge_runtime import layer_timing

    clock = [0.0]

    class Session:
        def __init__(self, ms: float) -> None:
            self.ms, self.calls = ms, 0

        def get_inputs(self):
            return []

        def run(self, _names, _feed):
            self.calls += 1
            clock[0] += self.ms * (10 if self.calls % 3 == 0 else 1) / 1000

    monkeypatch.setattr(layer_timing.time, "perf_counter", lambda: clock[0])
    dense, pruned = layer_timing._quantiles([Session(2.0), Session(1.0)], 5, 20)
    assert dense == pytest.approx(2.0) and pruned == pytest.approx(1.0)
    monkeypatch.setattr(layer_timing, "_session", lambda model, threads: Session(len(model)))
    assert layer_timing.time_networks([b"xx", b"x"], 1, 2, 6) == pytest.approx([2.0, 1.0])
