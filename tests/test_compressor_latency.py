"""--allocate latency: latency tables are read strictly (a hostile file is one line, exit 2), the
allocation keeps every width the rounding allows and never removes a layer, a table steers where
channels go, and a run that uses one resumes after SIGKILL to the same result."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
import torch

from compressor.prune.allocation import LatencyRanking
from compressor.prune.latency import LatencyModel, ladder
from compressor.prune.channels import Ranking, find_groups, full_plan
from compressor.prune.examples import example_input
from edge_runtime.layer_timing import FORMAT, LatencyTable, LatencyTableError, LayerShape, measure, read_table
from compressor.train.models import build_model, input_shape_of
from tests.compressor_fixtures import (ENV, REPO, TEMP_ROOT, assert_same_channel_runs, cli, compress_killed_at,
                                      run_tiny)


def _model(name: str, exclude=(), multiple: int = 8, min_channels=None):
    torch.manual_seed(0)
    model = build_model(name)
    example = example_input(input_shape_of(model))
    groups = find_groups(model, example, exclude)
    return model, groups, LatencyModel(model, example, groups, multiple, min_channels)


def _table(latency: LatencyModel, ms: Callable[[LayerShape], float]) -> LatencyTable:
    """A made-up table over every shape the model needs (no timing: the allocation is what is tested)."""
    return LatencyTable({s.key(): ms(s) for s in latency.shapes_needed()})


def _macs_like(shape: LayerShape) -> float:
    area = 1
    for d in shape.spatial:
        area *= d
    return 1e-6 * shape.cin * shape.cout * area + 1e-3


def _random_scores(groups, seed: int = 1) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {g.root: torch.rand(g.size, generator=generator) + 0.5 for g in groups}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- tables -----------------------------------------------------------------------------------------

def test_a_measured_table_round_trips_and_covers_the_model(tmp_path: Path) -> None:
    _, _, latency = _model("digits-cnn")
    table = measure(latency.shapes_needed(), rounds=1, runs=2)  # real onnxruntime sessions, one per shape
    assert table.threads == 1 and all(v > 0 for v in table.ms.values())
    again = read_table(_write(tmp_path / "t.json", table.to_json()))
    assert again.ms == table.ms  # exact: a resumed run plans from the very same numbers
    latency.use(again, "t.json")
    assert latency.predict({g.root: g.size for g in latency.groups}) > 0


VALID = {"format": FORMAT, "version": 1, "threads": 1, "ms": {"linear 8->10 @-": 0.01}}


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe not utf-8", "not valid JSON"),
    (b"{\"format\": ", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
    (b"[]", "not an edgeprune latency table"),
    (json.dumps({**VALID, "format": "other"}).encode(), "not an edgeprune latency table"),
    (json.dumps({**VALID, "version": 2}).encode(), "version 2"),
    (json.dumps({**VALID, "threads": True}).encode(), "threads"),
    (json.dumps({**VALID, "ms": []}).encode(), "\"ms\" must map"),
    (json.dumps({**VALID, "ms": {}}).encode(), "\"ms\" must map"),
    (json.dumps({**VALID, "ms": {"x": -1}}).encode(), "positive finite"),
    (json.dumps({**VALID, "ms": {"x": "1"}}).encode(), "positive finite"),
    (json.dumps({**VALID, "ms": {"x": False}}).encode(), "positive finite"),
    (json.dumps({**VALID, "ms": {"x": float("nan")}}).encode(), "positive finite"),
    (json.dumps({**VALID, "ms": {"x": 1e308 * 10}}).encode(), "positive finite"),
    (json.dumps({**VALID, "ms": {"k" * 500: 1.0}}).encode(), "positive finite"),
])
def test_hostile_tables_are_one_typed_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "table.json"
    path.write_bytes(content)
    with pytest.raises(LatencyTableError, match="table.json") as error:
        read_table(path)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_huge_or_missing_table_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(LatencyTableError, match="too large"):
        read_table(huge)
    with pytest.raises(LatencyTableError, match="cannot read it"):
        read_table(tmp_path / "absent.json")


def test_a_table_lacking_the_models_shapes_names_one(tmp_path: Path) -> None:
    _, _, latency = _model("digits-cnn")
    table = _table(latency, _macs_like)
    table.ms.pop(sorted(table.ms)[0])
    with pytest.raises(LatencyTableError, match="lacks 1 layer shape"):
        latency.use(table, "t.json")


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({**VALID, "ms": {"x": 0}}), "positive finite"),
    (json.dumps(VALID), "lacks"),  # well-formed, but for another model
])
def test_cli_bad_latency_table_is_one_line_exit_2_nothing_written(tmp_path: Path, content: str, needle: str) -> None:
    table = _write(tmp_path / "table.json", content)
    out = tmp_path / "run"
    code, _, stderr = cli(["compress", "--model", "digits-cnn", "--structure", "channels", "--allocate", "latency",
                           "--latency-table", str(table), "--epochs", "2", "--out", str(out)])
    assert code == 2 and stderr.count("\n") == 1 and needle in stderr, stderr
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--structure", "channels", "--allocate", "knapsack"], "unknown --allocate"),
    (["--allocate", "latency"], "needs --structure channels"),
    (["--structure", "channels", "--latency-table", "t.json"], "--latency-table needs --allocate latency"),
    (["--structure", "channels", "--target-speedup", "2"], "--target-speedup needs --allocate latency"),
    (["--structure", "channels", "--allocate", "latency", "--target-speedup", "2", "--target-macs", "0.5"],
     "not both"),
    (["--structure", "channels", "--allocate", "latency", "--target-speedup", "0.5"], "must be in (1, 1000]"),
    (["--structure", "channels", "--allocate", "latency", "--target-speedup", "fast"], "must be a number"),
    (["--structure", "channels", "--allocate", "latency", "--target-speedup", "900"], "out of reach"),
])
def test_bad_allocation_options_are_one_line(tmp_path: Path, args: list, needle: str) -> None:
    code, _, stderr = cli(["compress", "--model", "digits-cnn", "--epochs", "2", "--out", str(tmp_path / "r"), *args])
    assert code == 2 and stderr.count("\n") == 1 and needle in stderr, stderr
    assert not (tmp_path / "r").exists()


def test_a_multiple_too_fine_to_measure_is_a_config_error() -> None:
    from compressor.errors import ConfigError

    with pytest.raises(ConfigError, match="raise --channel-multiple"):
        _model("resnet20", multiple=1)[2].shapes_needed()


def test_table_tool_lists_shapes_then_measures_them_without_the_model(tmp_path: Path) -> None:
    shapes, table = tmp_path / "shapes.json", tmp_path / "table.json"
    tool = [sys.executable, "-m", "compressor.latency_shapes"]
    run = dict(cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    listed = subprocess.run([*tool, "--model", "digits-cnn", "--channel-multiple", "8", "--shapes-out", str(shapes)],
                            **run)
    assert listed.returncode == 0, listed.stderr
    # the device side, as a Pi's runtime venv runs it: edge_runtime, numpy, onnxruntime; no compressor, torch, onnx
    device = ("import runpy, sys; sys.path.insert(0, '.'); "
              "sys.modules['compressor'] = sys.modules['torch'] = sys.modules['onnx'] = None; "
              "runpy.run_module('edge_runtime.layer_timing', run_name='__main__')")
    measured = subprocess.run([sys.executable, "-I", "-c", device, "--shapes", str(shapes), "--out", str(table)],
                              **run)
    assert measured.returncode == 0, measured.stderr
    _, _, latency = _model("digits-cnn")
    latency.use(read_table(table), str(table))  # covers every shape compress will ask about
    _write(shapes, json.dumps({"shapes": [{"op": "conv", "cin": 3, "cout": 8, "kernel": [3], "stride": [1, 1]}]}))
    bad = subprocess.run([*tool, "--shapes", str(shapes), "--out", str(table)], **run)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "inconsistent" in bad.stderr, bad.stderr


def test_the_one_layer_models_compute_the_layer_they_describe() -> None:
    """layer_onnx writes its protobuf by hand (a Pi has no onnx package): onnx reads it back as that
    layer, and onnxruntime computes what PyTorch computes for it."""
    import onnx
    import onnxruntime as ort
    import torch.nn.functional as F

    from edge_runtime.layer_timing import LayerShape, layer_onnx

    shape = LayerShape("conv", 16, 32, (9, 9), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4)
    data = layer_onnx(shape)
    model = onnx.load_from_string(data)
    assert [n.op_type for n in model.graph.node] == ["Conv"] and model.opset_import[0].version == 17
    weight, bias = (onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer)
    assert weight.shape == (32, 4, 3, 3) and bias.shape == (32,)
    x = np.random.default_rng(0).standard_normal((1, 16, 9, 9)).astype(np.float32)
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), stride=2, padding=1,
                        groups=4).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


# --- the allocation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("multiple, min_channels, exclude", [(8, None, ()), (16, 8, ()), (8, None, ("blocks.4.conv1",))])
def test_every_latency_plan_keeps_allowed_widths_and_every_layer(multiple: int, min_channels, exclude) -> None:
    _, groups, latency = _model("resnet20", exclude, multiple, min_channels)
    latency.use(_table(latency, _macs_like), "made up")
    assert "blocks.4.conv1" not in {g.root for g in groups} or not exclude
    ranking = LatencyRanking(groups, full_plan(groups), _random_scores(groups), latency)
    allowed = {g.root: set(ladder(g, g.size, multiple, min_channels or multiple)) for g in groups}
    previous = full_plan(groups)
    for n in range(ranking.units + 1):
        plan = ranking.plan(n)
        for g in groups:
            assert len(plan[g.root]) in allowed[g.root] and len(plan[g.root]) >= (min_channels or multiple)
            assert set(plan[g.root]) <= set(previous[g.root])  # later moves only remove
        previous = plan
    assert all(len(previous[g.root]) == (min_channels or multiple) for g in groups)  # it ends at the floor


def _blocks_of_16(shape: LayerShape) -> float:
    """A CPU that computes 16 channels at a time: 8 or 24 channels cost as much as 16 or 32."""
    area = 1
    for d in shape.spatial:
        area *= d
    return 1e-5 * math.ceil(shape.cin / 16) * math.ceil(shape.cout / 16) * area + 1e-3


def test_global_table_rounds_to_the_widths_the_table_finds_faster() -> None:
    from compressor.prune.allocation import TableRounding

    _, groups, latency = _model("resnet20")
    latency.use(_table(latency, _blocks_of_16), "made up")
    scores = _random_scores(groups)
    rounded = TableRounding(groups, full_plan(groups), scores, latency)
    plain = Ranking(groups, full_plan(groups), scores, 8)
    assert rounded.units == plain.units  # the same global order: only the rounding differs
    for n in range(0, rounded.units + 1, 7):
        plan = rounded.plan(n)
        assert all(len(plan[g.root]) % 16 == 0 and len(plan[g.root]) >= 16 for g in groups), n
    # Under a table where every channel counts, it is the plain multiple-of-8 rounding again.
    latency.use(_table(latency, _macs_like), "made up")
    exact = TableRounding(groups, full_plan(groups), scores, latency)
    assert all(exact.plan(n) == plain.plan(n) for n in range(0, plain.units + 1, 7))


def test_a_table_steers_channels_away_from_slow_layers() -> None:
    """Layers at 8×8 made 50× slower per MAC: the latency allocation takes more of the last stage's
    channels than the global ranking does for the same number of channels removed."""
    _, groups, latency = _model("resnet20")
    latency.use(_table(latency, lambda s: _macs_like(s) * (50 if s.spatial == (8, 8) else 1)), "made up")
    current, scores = full_plan(groups), _random_scores(groups)
    steered = LatencyRanking(groups, current, scores, latency)
    plain = Ranking(groups, current, scores, 8)
    total = sum(g.size for g in groups)
    last_stage = [g.root for g in groups if g.root.startswith(("blocks.6", "blocks.7", "blocks.8"))]

    def removed_there(plan) -> int:
        return sum(64 - len(plan[root]) for root in last_stage)

    def first_removing(ranking, count: int):
        return next(ranking.plan(n) for n in range(ranking.units + 1)
                    if total - sum(len(v) for v in ranking.plan(n).values()) >= count)

    for count in (64, 128):
        a, b = first_removing(steered, count), first_removing(plain, count)
        assert removed_there(a) > removed_there(b), (count, removed_there(a), removed_there(b))


def test_a_resumed_run_plans_from_its_stored_table(tmp_path: Path) -> None:
    """RUN_DIR/latency_table.json, once written, is what the run uses, not a new measurement."""
    from compressor.prune.levels import ChannelLevels
    from compressor.config import PruneConfig
    from compressor.prune.criteria import criterion_named

    model, _, latency = _model("digits-cnn")
    stored = _table(latency, _macs_like)
    _write(tmp_path / "latency_table.json", stored.to_json())
    config = PruneConfig(structure="channels", allocate="latency", target_macs=0.5)
    levels = ChannelLevels(model, input_shape_of(model), config, criterion_named(None, "channels"))
    levels.attach_table(tmp_path, is_writer=True)
    assert levels.latency.table.ms == stored.ms


@pytest.mark.parametrize("allocate", ["latency", "global-table"])
def test_target_speedup_prunes_until_the_table_predicts_it(tmp_path: Path, allocate: str) -> None:
    _, _, latency = _model("digits-cnn")
    table = _write(tmp_path / "table.json", _table(latency, _macs_like).to_json())
    from tests.test_compressor_latency_plan import StubDevice

    result = run_tiny(tmp_path / "run", model_name="digits-cnn", structure="channels", allocate=allocate,
                      latency_table=str(table), target_speedup=2.5, epochs=1, lr_drops=(), channel_multiple=8,
                      latency_source=StubDevice())
    levels = result.metrics["methods"]["lr-rewind"]
    # met as measured (the stub device's network times), each level timed beside the dense network
    assert levels[-1]["measured_speedup"] >= 2.5 > levels[-2]["measured_speedup"]
    assert [lv["predicted_speedup"] for lv in levels] == sorted(lv["predicted_speedup"] for lv in levels)
    assert (tmp_path / "run" / "latency_table.json").read_text() == table.read_text()


LATENCY_ARGS = ["--model", "digits-cnn", "--structure", "channels", "--allocate", "latency", "--target-macs", "0.6",
                "--method", "lr-rewind,weight-rewind", "--epochs", "3", "--lr-drops", "2", "--rewind-epoch", "1",
                "--seed", "3", "--no-progress", "--channel-multiple", "8"]  # 8: enough levels to kill one


@pytest.mark.slow
def test_sigkilled_latency_run_resumes_to_the_same_result() -> None:
    _, _, latency = _model("digits-cnn")
    table = _write(TEMP_ROOT / "latency-table.json", _table(latency, _macs_like).to_json())
    args = [*LATENCY_ARGS, "--latency-table", str(table)]
    out = TEMP_ROOT / "latency-killed"
    proc = compress_killed_at([*args, "--out", str(out)], "weight-rewind", 2, 1, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "weight-rewind" / "level_2" / "checkpoint.pt").is_file()
    code, _, stderr = cli(["compress", *args, "--out", str(out), "--resume"], timeout=300)
    assert code == 0, stderr
    reference = TEMP_ROOT / "latency-whole"
    run_tiny(reference, model_name="digits-cnn", structure="channels", target_macs=0.6, allocate="latency",
             latency_table=str(table), methods=("lr-rewind", "weight-rewind"), channel_multiple=8)
    assert (out / "latency_table.json").read_text() == (reference / "latency_table.json").read_text()
    assert_same_channel_runs(out, reference)


def test_predicted_layer_shapes_match_the_shrunk_model(tmp_path: Path) -> None:
    """The width map (concat, depthwise, grouped conv, Linear after flatten) says exactly what each
    layer of the really shrunk network looks like, for every plan along a latency ranking."""
    from compressor.prune.latency import _dense_shape, _input_sizes
    from compressor.prune.channels import copy_model, shrink
    from tests.test_compressor_structured import USER_MODEL, _load, user_model

    model = _load(user_model(tmp_path, USER_MODEL))
    example = example_input(model.input_shape)
    groups = find_groups(model, example)
    latency = LatencyModel(model, example, groups, 8)
    latency.use(_table(latency, _macs_like), "made up")
    ranking = LatencyRanking(groups, full_plan(groups), _random_scores(groups), latency)
    assert ranking.units >= 2
    for n in range(ranking.units + 1):
        plan = ranking.plan(n)
        small = shrink(copy_model(model), full_plan(groups), plan, example)
        modules, sizes = dict(small.named_modules()), _input_sizes(small, example)
        removed = [g.size - len(plan[g.root]) for g in groups]
        for layer in latency.layers:
            assert layer.shape(removed) == _dense_shape(modules[layer.name], sizes[layer.name]), (n, layer.name)
