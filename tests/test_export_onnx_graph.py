"""The ONNX clean-up steps of export, on hand-built graphs: BatchNorm folding and layer naming."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compressor.export.onnx_graph import fold_batchnorm, layer_name, rename_tensors, weight_inputs


def conv_bn_model(with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight[weight < 0.3] = 0.0  # pruned entries must stay exactly zero through the fold
    inits = [numpy_helper.from_array(weight, "w")]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"))
        conv_inputs.append("b")
    for name, value in (("gamma", rng.uniform(0.5, 2, 4)), ("beta", rng.standard_normal(4)),
                        ("mean", rng.standard_normal(4)), ("var", rng.uniform(0.5, 2, 4))):
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="/features/features.0/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3),
             helper.make_node("Relu", ["y"], ["output"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fold_batchnorm_keeps_outputs_and_zeros() -> None:
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    for with_bias in (False, True):
        model = conv_bn_model(with_bias)
        before = run(model, x)
        zeros_before = int(np.sum(numpy_helper.to_array(model.graph.initializer[0]) == 0))
        assert fold_batchnorm(model.graph) == 1
        assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]
        assert np.max(np.abs(run(model, x) - before)) < 1e-5
        folded = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        weight = folded[model.graph.node[0].input[1]]
        assert int(np.sum(weight == 0)) == zeros_before
        assert set(folded) == set(model.graph.node[0].input[1:])  # BN parameters are gone


def test_layer_names_follow_the_torch_module_path() -> None:
    assert layer_name("/blocks/blocks.0/conv1/Conv", "x") == "blocks.0.conv1"
    assert layer_name("/blocks/blocks.3/shortcut/shortcut.0/Conv", "x") == "blocks.3.shortcut.0"
    assert layer_name("/net/net.0/Gemm", "x") == "net.0"
    assert layer_name("/fc/Gemm", "x") == "fc"
    assert layer_name("", "conv7") == "conv7"
    model = conv_bn_model(True)
    fold_batchnorm(model.graph)
    rename_tensors(model.graph)
    assert list(model.graph.node[0].input) == ["x", "features.0.weight", "features.0.bias"]
    assert weight_inputs(model.graph) == {"features.0.weight": ("features.0", "Conv")}
