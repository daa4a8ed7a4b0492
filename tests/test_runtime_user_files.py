"""What users' own ONNX files hold that the runtime tripped on (issue 21): an empty (batch-0) input,
an opset-6 PRelu with one slope per channel, a subgraph (refused, naming the file, not a MODEL_DIR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the files are written with the onnx package (not in the pinned venv)")
ort = pytest.importorskip("onnxruntime")

from edge_runtime import InferenceSession  # noqa: E402
from edge_runtime.errors import InputError, ModelDirError  # noqa: E402


def _save(path: Path, nodes, inputs, outputs, initializers=(), opset: int = 17) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conv (sparse weight) → Relu → MaxPool → Flatten → Gemm (sparse) → Softmax, batch axis free."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    fc = rng.standard_normal((3, 64)).astype(np.float32)
    fc[rng.random(fc.shape) < 0.9] = 0
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
             helper.make_node("Softmax", ["y"], ["s"], axis=1)]
    tensors = {"w": w, "b": np.ones(4, np.float32), "fc": fc, "fcb": np.ones(3, np.float32)}
    return _save(tmp_path_factory.mktemp("cnn") / "cnn.onnx", nodes,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                 [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["n", 3])],
                 [numpy_helper.from_array(a, name) for name, a in tensors.items()])


@pytest.mark.parametrize("kernels, threads", [("ort", 1), ("auto", 1), ("dense", 1), ("sparse", 1), ("sparse", 2)])
def test_an_empty_batch_is_answered_as_onnxruntime_answers(small_cnn: Path, kernels: str, threads: int) -> None:
    empty = np.zeros((0, 1, 8, 8), np.float32)
    expected, = ort.InferenceSession(str(small_cnn), providers=["CPUExecutionProvider"]).run(None, {"x": empty})
    session = InferenceSession(small_cnn, kernels=kernels, threads=threads)
    got, = session.run(None, {"x": empty})
    assert got.shape == expected.shape == (0, 3) and got.dtype == expected.dtype
    one = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    assert np.allclose(session.run(None, {"x": one})[0], ort.InferenceSession(str(small_cnn)).run(None, {"x": one})[0],
                       atol=1e-5)


def test_an_empty_input_the_native_engine_cannot_run_is_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    path = _save(tmp_path / "argmax.onnx", [helper.make_node("ArgMax", ["x"], ["y"], axis=0, keepdims=0)],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                 [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    session = InferenceSession(path, kernels="dense", threads=1)
    with pytest.raises(InputError, match=r"an empty input \(batch 0\): the native engine cannot run") as raised:
        session.run(None, {"x": np.zeros((0, 3), np.float32)})
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("shape", [[2, 3, 4], [2, 3, 4, 5], [2, 3, 4, 5, 6]])
def test_an_opset_6_prelu_has_one_slope_per_channel(tmp_path: Path, shape) -> None:
    """What torch exported for PReLU(num_parameters=3) at opset 6 (onnxruntime runs PRelu from opset 7
    only): the slope [3] applies along axis 1, as the onnx package's own expected outputs say."""
    from onnx import TensorProto, helper, numpy_helper

    slope = np.array([0.1, 0.5, 2.0], np.float32)
    path = _save(tmp_path / "prelu.onnx", [helper.make_node("PRelu", ["x", "slope"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                 [numpy_helper.from_array(slope, "slope")], opset=6)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    got, = InferenceSession(path, kernels="dense", threads=1).run(None, {"x": x})
    per_channel = slope.reshape(3, *([1] * (len(shape) - 2)))
    assert np.array_equal(got, np.where(x < 0, x * per_channel, x))


def test_the_onnx_packages_opset_6_prelu_cases_pass() -> None:
    import os

    import onnx
    from onnx import numpy_helper

    root = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "pytorch-converted"
    cases = sorted(root.glob("test_PReLU_*multiparam"))
    assert cases
    for case in cases:
        x = numpy_helper.to_array(onnx.load_tensor(str(case / "test_data_set_0" / "input_0.pb")))
        expected = numpy_helper.to_array(onnx.load_tensor(str(case / "test_data_set_0" / "output_0.pb")))
        session = InferenceSession(case / "model.onnx", kernels="dense", threads=1)
        got, = session.run(None, {session.get_inputs()[0].name: x})
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6), case.name


def test_a_subgraph_in_a_plain_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    branch = lambda name: helper.make_graph([helper.make_node("Identity", ["x"], [name])], name, [],
                                            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
    path = _save(tmp_path / "if.onnx", [helper.make_node("If", ["c"], ["y"], then_branch=branch("a"),
                                                         else_branch=branch("b"))],
                 [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                  helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(ModelDirError) as raised:
        InferenceSession(path, kernels="ort", threads=1)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "in a plain ONNX file" in message and "MODEL_DIR" not in message
