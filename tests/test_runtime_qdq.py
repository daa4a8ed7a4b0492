"""A Conv whose weight is computed in the graph: the QDQ models ``onnxruntime.quantization`` writes.

Every depthwise weight of a QDQ MobileNet comes out of a DequantizeLinear node, so load cannot read its
shape; the runtime must still run what stock onnxruntime runs (issue 21), and a group that does not fit
must be refused when the arrays are known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the float model is built with the onnx package (not in the pinned venv)")
ort = pytest.importorskip("onnxruntime")

from edge_runtime import InferenceSession  # noqa: E402
from edge_runtime.errors import ModelDirError  # noqa: E402

CHANNELS = 16


def _float_model(path: Path, group: int = CHANNELS) -> Path:
    """x [N, 8, 8, 8] → 1x1 Conv to 16 channels → Relu → depthwise 3x3 Conv → Relu → pool → Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((CHANNELS, 8, 1, 1)), "b1": rng.standard_normal(CHANNELS),
               "w2": rng.standard_normal((CHANNELS, CHANNELS // group, 3, 3)), "b2": rng.standard_normal(CHANNELS),
               "fc": rng.standard_normal((10, CHANNELS)), "fcb": rng.standard_normal(10)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], group=group, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a.astype(np.float32), name) for name, a in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader protocol: a few seeded batches."""

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self._batches: Iterator[Dict[str, np.ndarray]] = iter(
            [{"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._batches, None)


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("qdq")
    source = _float_model(folder / "float.onnx")
    target = folder / "qdq.onnx"
    quantize_static(str(source), str(target), _Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return target


def _dequantized_depthwise(path: Path) -> bool:
    """Whether the depthwise Conv's weight is the output of a DequantizeLinear node (what makes its
    shape unknown to load)."""
    import onnx

    graph = onnx.load(str(path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    grouped = [n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return len(grouped) == 1 and made_by.get(grouped[0].input[1]) == "DequantizeLinear"


@pytest.mark.parametrize("kernels", ["ort", "auto"])
def test_a_qdq_depthwise_model_runs_as_onnxruntime_runs_it(qdq_model: Path, kernels: str) -> None:
    assert _dequantized_depthwise(qdq_model)
    x = np.random.default_rng(2).standard_normal((3, 8, 8, 8)).astype(np.float32)
    reference, = ort.InferenceSession(str(qdq_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    session = InferenceSession(qdq_model, kernels=kernels, threads=1)
    got, = session.run(None, {"x": x})
    assert got.shape == (3, 10)
    assert np.max(np.abs(got - reference)) <= 1e-4


def test_a_computed_depthwise_weight_runs_natively(tmp_path: Path) -> None:
    """The same group check at run time, in the native Conv op: a weight made by Identity from an
    initializer (so no engine can read its shape at load) computes what onnxruntime computes."""
    import onnx

    model = onnx.load(str(_float_model(tmp_path / "float.onnx")))
    conv = model.graph.node[2]
    model.graph.node.insert(2, onnx.helper.make_node("Identity", ["w2"], ["w2_computed"]))
    conv.input[1] = "w2_computed"
    onnx.save(model, str(tmp_path / "computed.onnx"))
    x = np.random.default_rng(3).standard_normal((2, 8, 8, 8)).astype(np.float32)
    reference, = ort.InferenceSession(str(tmp_path / "computed.onnx"),
                                      providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got, = InferenceSession(tmp_path / "computed.onnx", kernels="dense", threads=1).run(None, {"x": x})
    assert np.max(np.abs(got - reference)) <= 1e-4


def test_a_group_that_cannot_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    """group 3 of 16 channels: refused at load when the weight is an initializer, at run time (by the
    native op) when it is computed, since load cannot see its shape."""
    import onnx

    path = _float_model(tmp_path / "bad.onnx")
    model = onnx.load(str(path))
    next(a for a in model.graph.node[2].attribute if a.name == "group").i = 3
    onnx.save(model, str(path))
    with pytest.raises(ModelDirError, match=r"group 3, which does not divide its 16 output channels"):
        InferenceSession(path, kernels="dense", threads=1)
    model.graph.node.insert(2, onnx.helper.make_node("Identity", ["w2"], ["w2_computed"]))
    model.graph.node[3].input[1] = "w2_computed"
    onnx.save(model, str(path))
    session = InferenceSession(path, kernels="dense", threads=1)
    with pytest.raises(ModelDirError, match=r"group 3 does not fit input of shape \[1, 16, 8, 8\]"):
        session.run(None, {"x": np.zeros((1, 8, 8, 8), np.float32)})


def test_a_declared_input_channel_count_is_checked_at_load(tmp_path: Path) -> None:
    """A Conv reading a graph input whose channels are declared: a group not dividing them is refused
    at load even when the weight is computed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((6, 2, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["wc"]),
                               helper.make_node("Conv", ["x", "wc"], ["y"], group=4)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    for kernels in ("ort", "dense"):
        with pytest.raises(ModelDirError, match="group 4, which does not divide its 6 input channels"):
            InferenceSession(tmp_path / "g.onnx", kernels=kernels, threads=1)
