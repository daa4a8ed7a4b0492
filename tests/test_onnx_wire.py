"""edge_runtime.onnx_wire decodes what the real ``onnx`` package writes, and refuses what it must."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import ModelDirError
from edge_runtime.onnx_check import _attribute_value
from edge_runtime.onnx_wire import parse_model
from tests.runtime_fixtures import model_dir


def _model(**graph_extra) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    external = onnx.TensorProto(name="e", data_type=TensorProto.FLOAT, dims=[4],
                                data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.npz"), ("offset", "128"), ("length", "16")):
        entry = external.external_data.add()
        entry.key, entry.value = key, value
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "s"),
                                       numpy_helper.from_array(np.array([0, 5], np.int64), "s.coo"), [2, 3])
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["y"], name="g", alpha=0.5, transB=1),
        helper.make_node("Pad", ["y"], ["z"], mode="reflect", pads=[0, -1, 2, 3]),
        helper.make_node("Mul", ["z", "z"], ["out"], domain="", scales=[1.0, -2.5],
                         names=["a", "b"], value=numpy_helper.from_array(np.array([[1, -2]], np.int64))),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[weight, external], sparse_initializer=[sparse], **graph_extra)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("x.y", 2)])


def test_decodes_nodes_attributes_initializers_and_opsets() -> None:
    proto = _model()
    model = parse_model(proto.SerializeToString())
    assert model.opsets == {"": 17, "x.y": 2} and model.inputs == ["x"] and model.outputs == ["out"]
    assert [(n.op_type, n.name, n.inputs, n.outputs) for n in model.nodes] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in proto.graph.node]
    for mine, theirs in zip(model.nodes, proto.graph.node):  # attributes as export's manifest spells them
        expected = {a.name: helper.get_attribute_value(a) for a in theirs.attribute}
        got = {a.name: _attribute_value(a, "t") for a in mine.attributes}
        for name, value in expected.items():
            if isinstance(value, onnx.TensorProto):
                array = numpy_helper.to_array(value)
                value = {"tensor": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}
            elif isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, list):
                value = [v.decode() if isinstance(v, bytes) else v for v in value]
            assert got[name] == value, name
    weight, external = model.initializers
    assert weight.name == "w" and weight.dims == [2, 3] and weight.raw_data is not None
    assert np.array_equal(np.frombuffer(weight.raw_data, np.float32), np.arange(6))
    assert external.is_external and external.external == {"location": "weights.npz", "offset": "128",
                                                           "length": "16"}
    sparse, = model.sparse_initializers
    assert sparse.dims == [2, 3] and sparse.values.name == "s" and sparse.indices.name == "s.coo"


def test_decodes_every_exported_fixture_like_onnx_does() -> None:
    for name in ("digits-mlp", "resnet20", "residual-cnn", "mlp-block", "digits-mlp-fp16"):
        data = (model_dir(name) / "model.onnx").read_bytes()
        proto, model = onnx.load_from_string(data), parse_model(data)
        assert [n.op_type for n in model.nodes] == [n.op_type for n in proto.graph.node]
        assert [t.name for t in model.initializers] == [t.name for t in proto.graph.initializer]
        assert len(model.sparse_initializers) == len(proto.graph.sparse_initializer)


@pytest.mark.parametrize("mutate", [
    lambda p: p.graph.node[0].attribute.append(
        helper.make_attribute("then_branch", helper.make_graph([], "s", [], []))),
    lambda p: p.functions.append(onnx.FunctionProto(name="f", domain="d")),
    lambda p: p.training_info.add(),
], ids=["subgraph attribute", "function", "training info"])
def test_refuses_parts_that_could_hide_data(mutate) -> None:
    proto = _model()
    mutate(proto)
    with pytest.raises(ModelDirError, match="not accepted|type"):
        parse_model(proto.SerializeToString())


@pytest.mark.parametrize("data", [b"\x3a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11, b"\x0b\x00", b"\x00\x00",
                                  b"\x3a\x02\x0a", b"", b"\x3a\x00\x3a\x00"])
def test_truncated_or_hostile_bytes_are_model_dir_errors(data: bytes) -> None:
    with pytest.raises(ModelDirError):
        parse_model(data)


def test_every_truncation_of_a_real_model_is_clean() -> None:
    data = _model().SerializeToString()
    for end in range(len(data)):
        try:
            parse_model(data[:end])
        except ModelDirError:
            pass
