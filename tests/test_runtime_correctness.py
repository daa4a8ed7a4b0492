"""The runtime's outputs equal stock onnxruntime's on model.onnx and PyTorch's, for every kernels choice.

Torch-free: MODEL_DIRs and PyTorch's outputs come from tests/runtime_fixtures.py (built with torch in
the main env, or prebuilt for the pinned numpy 1.24 / scipy 1.10 venv).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime import InferenceSession, UnsupportedOpError
from tests.runtime_fixtures import example_input, model_dir, torch_output

SUPPORTED = ["digits-mlp", "digits-cnn", "resnet20", "residual-cnn", "mlp-block", "hardswish", "mobile-cnn"]
TOLERANCE = 1e-4


def ort_output(name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir(name) / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernels", ["auto", "sparse", "dense", "ort"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_outputs_match_onnxruntime_and_torch(name: str, kernels: str, threads: int) -> None:
    x = example_input(name)
    session = InferenceSession(model_dir(name), kernels=kernels, threads=threads)
    got = session.run(None, {"input": x})[0]
    assert got.dtype == np.float32 and got.shape == torch_output(name).shape
    assert np.max(np.abs(got - ort_output(name, x))) <= TOLERANCE
    assert np.max(np.abs(got - torch_output(name))) <= TOLERANCE
    # batch 1 takes the matrix-vector paths: check them too
    one = session.run(None, {"input": x[:1]})[0]
    assert np.max(np.abs(one - torch_output(name)[:1])) <= TOLERANCE


@pytest.mark.parametrize("name", SUPPORTED)
def test_forced_kernels_really_use_that_kernel(name: str) -> None:
    sparse = InferenceSession(model_dir(name), kernels="sparse", threads=1)
    dense = InferenceSession(model_dir(name), kernels="dense", threads=1)
    assert sparse.engine == dense.engine == "native"
    assert set(sparse.plan["layers"].values()) == {"sparse"}
    assert set(dense.plan["layers"].values()) == {"dense"}
    assert len(sparse.plan["layers"]) == len(sparse.manifest["layers"])


def test_float16_weights_match_onnxruntime() -> None:
    name = "digits-mlp-fp16"
    x = example_input(name)
    expected = ort_output(name, x)
    for kernels in ("sparse", "dense", "auto"):
        got = InferenceSession(model_dir(name), kernels=kernels, threads=1).run(None, {"input": x})[0]
        assert np.max(np.abs(got - expected)) <= TOLERANCE
    # float16 values are a rounding of the float32 ones: close to PyTorch, not equal
    assert np.max(np.abs(expected - torch_output(name))) < 0.05


def test_unsupported_op_is_named_or_falls_back_to_onnxruntime() -> None:
    name = "cumsum"
    for kernels in ("sparse", "dense"):
        with pytest.raises(UnsupportedOpError, match="CumSum"):
            InferenceSession(model_dir(name), kernels=kernels)
    session = InferenceSession(model_dir(name), kernels="auto", retune=True)
    assert session.engine == "ort" and "CumSum" in session.plan["reason"]
    x = example_input(name)
    assert np.max(np.abs(session.run(None, {"input": x})[0] - torch_output(name))) <= TOLERANCE


def test_api_mirrors_onnxruntime() -> None:
    session = InferenceSession(model_dir("resnet20"), kernels="sparse")
    reference = ort.InferenceSession(str(model_dir("resnet20") / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in reference.get_inputs()]
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    assert [o.name for o in session.get_outputs()] == [o.name for o in reference.get_outputs()]
    x = example_input("resnet20")
    by_name = session.run(["output"], {"input": x})
    assert len(by_name) == 1 and np.array_equal(by_name[0], session.run(None, {"input": x})[0])
