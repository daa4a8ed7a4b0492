"""edge_runtime.layer_timing, the device side of latency tables: the int8 one-layer models are what
onnxruntime's own quantizer writes (same fused kernels), a measured table carries its fixed costs and
the device's fingerprint, whole networks are timed, and tables unfit to plan with (flat, inverted,
NaN, missing shapes) are refused or warned about in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest

from edge_runtime.layer_timing import (ENGINES, FORMAT, LatencyTable, LatencyTableError, LayerShape,
                                       check_for_planning, device_fingerprint, input_dims, layer_onnx, macs,
                                       measure, parse_network_times, read_table, time_networks, write_shapes)
from tests.compressor_fixtures import ENV, REPO

CONV = LayerShape("conv", 16, 32, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
DEPTHWISE = LayerShape("conv", 16, 16, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16)
GEMM = LayerShape("linear", 64, 10)
TOKENS = LayerShape("linear", 16, 32, (4,))
FAST = dict(rounds=1, runs=2)  # what is tested is the bookkeeping, not the figures


def _widths(cins=(8, 16, 32), couts=(8, 16, 32)) -> List[LayerShape]:
    return [LayerShape("conv", a, b, (16, 16), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1) for a in cins for b in couts]


def _optimized_ops(model: bytes, folder: Path) -> List[str]:
    """The op types onnxruntime runs after its graph optimizations (QDQ fusion included)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return sorted(node.op_type for node in onnx.load(str(folder / "optimized.onnx")).graph.node)


def _fp32_source(shape: LayerShape) -> bytes:
    """The fp32 layer as torch exports it (nn.Linear on a 2-D input is a Gemm)."""
    if shape is not GEMM:
        return layer_onnx(shape)
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)], "g",
        [helper.make_tensor_value_info("X", 1, [1, shape.cin])], [helper.make_tensor_value_info("Y", 1, None)],
        [numpy_helper.from_array(rng.standard_normal((shape.cout, shape.cin)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(shape.cout).astype(np.float32), "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@pytest.mark.parametrize("shape", [CONV, DEPTHWISE, GEMM, TOKENS], ids=["conv", "depthwise", "gemm", "matmul"])
def test_int8_layers_fuse_like_onnxruntimes_quantizer(tmp_path: Path, shape: LayerShape) -> None:
    """The hand-written QDQ layer (no onnx package on a Pi) runs the same fused int8 kernels as
    quantize_static's output for the fp32 layer, with export --quantize int8's settings."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"X": np.random.default_rng(i).standard_normal(input_dims(shape)).astype(np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    (tmp_path / "fp32.onnx").write_bytes(_fp32_source(shape))
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    extra_options={"WeightSymmetric": True})
    theirs = _optimized_ops((tmp_path / "int8.onnx").read_bytes(), tmp_path)
    ours = _optimized_ops(layer_onnx(shape, "ort-int8"), tmp_path)
    assert ours == theirs and any(op.startswith(("QLinear", "QGemm")) for op in ours), (ours, theirs)


def test_a_measured_table_carries_engine_fixed_costs_and_device(tmp_path: Path) -> None:
    for engine in ENGINES:
        table = measure([CONV, GEMM, TOKENS], engine=engine, **FAST)
        assert table.engine == engine and set(table.ms) == {CONV.key(), GEMM.key(), TOKENS.key()}
        assert table.call_ms > 0 and table.node_ms >= 0 and table.device == device_fingerprint()
        path = tmp_path / f"{engine}.json"
        path.write_text(table.to_json())
        assert read_table(path) == table
    assert "onnxruntime" in table.device and "numpy" in table.device and "cores" in table.device


def test_a_table_written_before_engines_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "threads": 2, "measured_on": "pi", "ms": {"x": 1.5}}))
    assert read_table(path) == LatencyTable({"x": 1.5}, 2, "pi", "ort", 0.0, 0.0, "")


@pytest.mark.parametrize("extra, needle", [
    ({"engine": "tensorrt"}, "\"engine\""),
    ({"engine": ["ort"]}, "\"engine\""),
    ({"call_ms": float("nan")}, "\"call_ms\""),
    ({"call_ms": -1}, "\"call_ms\""),
    ({"node_ms": "0.1"}, "\"node_ms\""),
    ({"node_ms": True}, "\"node_ms\""),
])
def test_hostile_engine_and_fixed_costs_are_one_line(tmp_path: Path, extra: dict, needle: str) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "ms": {"x": 1.0}, **extra}))
    with pytest.raises(LatencyTableError, match="table.json") as error:
        read_table(path)
    assert needle in str(error.value) and "\n" not in str(error.value)


# --- fit to plan with ---------------------------------------------------------------------------------

def test_a_measured_table_is_fit_to_plan_with() -> None:
    shapes = _widths()
    check_for_planning(measure(shapes, rounds=2, runs=5), shapes, "measured")  # not refused (noise may warn)
    table = LatencyTable({s.key(): 1e-4 * macs(s) ** 0.9 + 0.01 for s in shapes})
    assert check_for_planning(table, shapes, "t.json") == []


@pytest.mark.parametrize("kind, needle", [
    ("flat", "is flat"),
    ("inverted", "is inverted"),
    ("missing", "lacks 1 of the 9"),
])
def test_tables_unfit_to_plan_with_are_refused_in_one_line(kind: str, needle: str) -> None:
    shapes = _widths()
    ms = {"flat": lambda s: 1.0, "inverted": lambda s: 1000.0 / macs(s), "missing": lambda s: 1e-4 * macs(s)}[kind]
    table = LatencyTable({s.key(): ms(s) for s in shapes})
    if kind == "missing":
        table.ms.pop(shapes[4].key())
    with pytest.raises(LatencyTableError, match="t.json") as error:
        check_for_planning(table, shapes, "t.json")
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_nan_table_never_reaches_planning(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "ms": {s.key(): float("nan") for s in _widths()}}))
    with pytest.raises(LatencyTableError, match="positive finite"):
        read_table(path)


def test_one_inverted_family_and_overhead_sized_layers_are_warnings() -> None:
    shapes = _widths() + [
        LayerShape("conv", c, c, (4, 4), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1) for c in (8, 16, 32)]
    ms = {s.key(): 1e-4 * macs(s) for s in shapes}
    for shape, slower in zip(shapes[-3:], (0.05, 0.03, 0.01)):  # the 1x1 family: wider is faster
        ms[shape.key()] = slower
    warnings = check_for_planning(LatencyTable(ms), shapes, "t.json")
    assert len(warnings) == 1 and "1 of 2 layer families" in warnings[0] and "\n" not in warnings[0]
    ms[shapes[0].key()] = 10.0  # one slow narrow width in the 3x3 family: a kernel's quirk, not an inversion
    assert len(check_for_planning(LatencyTable(ms), shapes, "t.json")) == 1
    tiny = LatencyTable({s.key(): 1e-4 for s in shapes[:-3]} | {s.key(): 1.0 + i for i, s in enumerate(shapes[-3:])})
    assert any("at or below the per-call overhead" in w for w in check_for_planning(tiny, shapes, "t.json"))


# --- whole networks, and the command line a device runs -----------------------------------------------

def test_time_networks_times_fp32_and_int8_networks() -> None:
    ms = time_networks([layer_onnx(CONV), layer_onnx(CONV, "ort-int8")], **FAST)
    assert len(ms) == 2 and all(m > 0 for m in ms)


def _device_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m edge_runtime.layer_timing`` as a Pi's runtime venv runs it: no compressor, torch, onnx."""
    device = ("import runpy, sys; sys.path.insert(0, '.'); "
              "sys.modules['compressor'] = sys.modules['torch'] = sys.modules['onnx'] = None; "
              "runpy.run_module('edge_runtime.layer_timing', run_name='__main__')")
    return subprocess.run([sys.executable, "-I", "-c", device, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)


def test_device_cli_measures_int8_times_networks_and_prints_its_fingerprint(tmp_path: Path) -> None:
    write_shapes([CONV, GEMM], tmp_path / "shapes.json")
    done = _device_cli("--shapes", str(tmp_path / "shapes.json"), "--engine", "ort-int8", "--rounds", "1",
                       "--runs", "2", "--out", str(tmp_path / "t.json"))
    assert done.returncode == 0, done.stderr
    assert read_table(tmp_path / "t.json").engine == "ort-int8"
    (tmp_path / "a.onnx").write_bytes(layer_onnx(CONV))
    (tmp_path / "b.onnx").write_bytes(layer_onnx(GEMM, "ort-int8"))
    done = _device_cli("--networks", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--rounds", "1",
                       "--runs", "2", "--out", str(tmp_path / "times.json"))
    assert done.returncode == 0, done.stderr
    assert len(parse_network_times(json.loads((tmp_path / "times.json").read_text()), "times", 2)) == 2
    done = _device_cli("--fingerprint")
    assert done.returncode == 0 and json.loads(done.stdout)["device"] == device_fingerprint()


@pytest.mark.parametrize("args, needle", [
    (["--threads", "100000"], "--threads must be an integer in [1, "),
    (["--threads", "0"], "--threads must be an integer in [1, "),
    (["--rounds", "0"], "--rounds must be in"),
])
def test_device_cli_bounds_its_numbers_in_one_line(tmp_path: Path, args: list, needle: str) -> None:
    write_shapes([CONV], tmp_path / "shapes.json")
    done = _device_cli("--shapes", str(tmp_path / "shapes.json"), "--out", str(tmp_path / "t.json"), *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr
    assert not (tmp_path / "t.json").exists()


def test_a_network_onnxruntime_refuses_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    os.mkfifo(tmp_path / "fifo.onnx")
    for name in ("bad.onnx", "fifo.onnx"):
        done = _device_cli("--networks", str(tmp_path / name), "--out", str(tmp_path / "times.json"))
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "times.json").exists()


@pytest.mark.parametrize("data", [
    {"format": "edgeprune-network-times", "ms": [1.0]},
    {"format": "edgeprune-network-times", "ms": ["fast", 1.0]},
    {"format": "edgeprune-network-times", "ms": [float("nan"), 1.0]},
    {"format": "x", "ms": [1.0, 1.0]},
    [1.0, 1.0],
])
def test_bad_network_times_from_a_device_are_one_line(data) -> None:
    with pytest.raises(LatencyTableError) as error:
        parse_network_times(data, "dev", 2)
    assert "\n" not in str(error.value)
