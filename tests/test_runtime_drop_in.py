"""``edge_runtime.InferenceSession`` as a drop-in for ``onnxruntime.InferenceSession``: the same call
(sess_options, providers, model bytes) and the same answers, side by side on one file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the file is written with the onnx package (not in the pinned venv)")
ort = pytest.importorskip("onnxruntime")

import edge_runtime  # noqa: E402
from edge_runtime.errors import EdgeRuntimeError  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x [?, "n", 8] → MatMul → Tanh → y, and int64 ids → ids * 2; with every kind of metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"]),
             helper.make_node("Mul", ["ids", "two"], ["ids2"])]
    graph = helper.make_graph(
        nodes, "side_by_side",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, "n", 8]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, "n", 5]),
         helper.make_tensor_value_info("ids2", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(2, np.int64), "two")],
        doc_string="the graph's own words")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="a user",
                              producer_version="1.2", domain="org.example", model_version=7,
                              doc_string="what the model is")
    helper.set_model_props(model, {"labels": "cat,dog", "author": "me"})
    path = tmp_path_factory.mktemp("drop_in") / "model.onnx"
    onnx.save(model, str(path))
    return path


FEED = {"x": np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32),
        "ids": np.arange(4, dtype=np.int64)}


def _both(path, **ours):
    """onnxruntime's session and ours, made by the same call."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    theirs = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    mine = edge_runtime.InferenceSession(path, options, providers=["CPUExecutionProvider"], **ours)
    return theirs, mine


@pytest.mark.parametrize("kernels", ["auto", "dense", "ort"])
def test_the_same_call_gives_the_same_answers(model_path: Path, kernels: str) -> None:
    theirs, mine = _both(str(model_path), kernels=kernels)
    for names in (None, ["ids2"], ["y", "ids2"]):
        expected, got = theirs.run(names, FEED), mine.run(names, FEED)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert mine.threads == 2  # from sess_options.intra_op_num_threads


def test_inputs_providers_and_metadata_match_onnxruntime(model_path: Path) -> None:
    theirs, mine = _both(str(model_path))
    assert [(a.name, a.shape, a.type) for a in mine.get_inputs()] == [
        (a.name, a.shape, a.type) for a in theirs.get_inputs()]
    assert [(a.name, a.type) for a in mine.get_outputs()] == [(a.name, a.type) for a in theirs.get_outputs()]
    assert mine.get_providers() == theirs.get_providers() == ["CPUExecutionProvider"]
    fields = ("producer_name", "graph_name", "domain", "description", "graph_description", "version",
              "custom_metadata_map")
    expected = {f: getattr(theirs.get_modelmeta(), f) for f in fields}
    assert {f: getattr(mine.get_modelmeta(), f) for f in fields} == expected
    assert expected["custom_metadata_map"] == {"labels": "cat,dog", "author": "me"}


def test_model_bytes_load_as_the_file_does(model_path: Path) -> None:
    data = model_path.read_bytes()
    theirs, mine = _both(data)
    for a, b in zip(mine.run(None, FEED), theirs.run(None, FEED)):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert mine.get_modelmeta().producer_name == "a user"
    with pytest.raises(EdgeRuntimeError, match="model bytes: not an ONNX model|^model bytes: "):
        edge_runtime.InferenceSession(data[:40])


def test_other_providers_are_ignored_with_a_warning_as_a_cpu_build_does(model_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"ignoring providers \['CUDAExecutionProvider'\]"):
        session = edge_runtime.InferenceSession(model_path, providers=["CUDAExecutionProvider",
                                                                       ("CPUExecutionProvider", {})])
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.warns(UserWarning, match="CPU only"):
        edge_runtime.InferenceSession(model_path, providers=["CUDAExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edge_runtime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    with pytest.raises(EdgeRuntimeError, match="providers must be a list"):
        edge_runtime.InferenceSession(model_path, providers="CPUExecutionProvider")


def test_explicit_threads_win_and_bad_options_are_one_line(model_path: Path) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 3
    assert edge_runtime.InferenceSession(model_path, options, threads=1).threads == 1
    assert edge_runtime.InferenceSession(model_path, options).threads == 3
    with pytest.raises(EdgeRuntimeError, match="sess_options must be an onnxruntime.SessionOptions"):
        edge_runtime.InferenceSession(model_path, {"intra_op_num_threads": 2})


def test_a_model_dir_reports_its_model_onnx_metadata() -> None:
    pytest.importorskip("torch", reason="the MODEL_DIR fixtures are exported with torch")
    import onnx

    from tests.runtime_fixtures import model_dir

    folder = model_dir("digits-mlp")
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    session = edge_runtime.InferenceSession(folder, kernels="dense", threads=1)
    meta = session.get_modelmeta()
    assert (meta.producer_name, meta.graph_name, meta.version) == (
        proto.producer_name, proto.graph.name, proto.model_version)
    assert session.get_providers() == ["CPUExecutionProvider"]
