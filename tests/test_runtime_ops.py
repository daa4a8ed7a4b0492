"""Native ops against stock onnxruntime on models built here with onnx.helper: grouped and depthwise
Conv (every kernel kind), pooling edge cases, opset-dependent defaults, extra outputs, training modes
and dtypes. The executor is fed through graph.compile_nodes, as the conformance suite does."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="models are built with onnx.helper")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_runtime.errors import UnsupportedOpError  # noqa: E402
from edge_runtime.graph import ArrayWeights, compile_nodes  # noqa: E402
from tests.conformance import node_dicts  # noqa: E402

ORT_VERSION = tuple(int(part) for part in ort.__version__.split(".")[:2])
DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
          np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.bool_): TensorProto.BOOL}


def model(nodes: List[Any], feed: Dict[str, np.ndarray], outputs: Sequence[str],
          initializers: Dict[str, np.ndarray], opset: int = 17) -> Any:
    inputs = [helper.make_tensor_value_info(n, DTYPES[a.dtype], list(a.shape)) for n, a in feed.items()]
    outs = [onnx.ValueInfoProto(name=n) for n in outputs]  # types left to onnxruntime's inference
    graph = helper.make_graph(nodes, "g", inputs, outs,
                              [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def ort_run(proto: Any, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def native(proto: Any, feed: Dict[str, np.ndarray], kind: str = "dense", sparse: bool = False) -> List[np.ndarray]:
    graph = proto.graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    program = compile_nodes(node_dicts(graph), list(feed), [o.name for o in graph.output],
                            ArrayWeights(tensors, sparse=list(tensors) if sparse else ()), lambda _: kind,
                            opset=proto.opset_import[0].version)
    return program.run(feed)


def assert_matches(proto: Any, feed: Dict[str, np.ndarray], atol: float = 1e-5, **kwargs: Any) -> List[np.ndarray]:
    expected = ort_run(proto, feed)
    got = native(proto, feed, **kwargs)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-4)
    return got


CONVS = [  # (in, out, group, kernel, stride, pad, dilation): depthwise, depthwise ×2, grouped, 1-D, 3-D
    (8, 8, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (6, 6, 6, (5, 5), (2, 2), (2, 1, 2, 1), (1, 1)),
    (4, 8, 4, (3, 3), (1, 2), (1, 1, 1, 1), (2, 1)),
    (12, 6, 3, (3, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (6, 6, 2, (3,), (2,), (1, 1), (1,)),
    (4, 4, 4, (2, 3, 3), (1, 1, 1), (0, 1, 1, 0, 1, 1), (1, 1, 1)),
]


@pytest.mark.parametrize("kind", ["dense", "sparse", "sparse-mt"])
@pytest.mark.parametrize("spec", CONVS, ids=lambda s: f"c{s[0]}o{s[1]}g{s[2]}k{len(s[3])}d")
@pytest.mark.parametrize("batch", [1, 3])
def test_grouped_and_depthwise_conv_match_onnxruntime(spec: tuple, kind: str, batch: int) -> None:
    channels, out, group, kernel, stride, pads, dilation = spec
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out, channels // group, *kernel)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.6] = 0  # pruned: the CSR kernels see real sparsity
    bias = rng.standard_normal(out).astype(np.float32)
    x = rng.standard_normal((batch, channels, *([9] * len(kernel)))).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, kernel_shape=list(kernel),
                            strides=list(stride), pads=list(pads), dilations=list(dilation))
    proto = model([node], {"x": x}, ["y"], {"w": weight, "b": bias})
    assert_matches(proto, {"x": x}, kind=kind, sparse=kind != "dense")


@pytest.mark.parametrize("ceil_mode", [0, 1])
@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("size,kernel,stride,pads", [(7, 3, 2, (1, 1, 1, 1)), (6, 3, 2, (1, 1, 0, 0)),
                                                     (5, 2, 2, (0, 0, 1, 1)), (8, 3, 3, (1, 1, 1, 1))])
def test_average_pool_ceil_and_padding_match_onnxruntime(size: int, kernel: int, stride: int, pads: tuple,
                                                         ceil_mode: int, count_include_pad: int) -> None:
    n = -(-(size + pads[0] + pads[2] - kernel) // stride) + 1
    if ceil_mode and (n - 1) * stride >= size + pads[0] and ORT_VERSION < (1, 32):
        pytest.skip("onnxruntime 1.19 still lets the last ceil_mode window start in the end padding "
                    "(1.32 follows the ONNX spec, as the runtime does)")
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                            pads=list(pads), ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    assert_matches(model([node], {"x": x}, ["y"], {}), {"x": x})
    max_node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                                pads=list(pads), ceil_mode=ceil_mode)
    assert_matches(model([max_node], {"x": x}, ["y"], {}), {"x": x})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_default_axis_follows_the_opset(op: str, opset: int) -> None:
    """Before opset 13: axis 1 and the input coerced to 2-D (squeezenet's final Softmax)."""
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)
    got = assert_matches(model([helper.make_node(op, ["x"], ["y"])], {"x": x}, ["y"], {}, opset), {"x": x})[0]
    reduce = np.exp(got).sum if op == "LogSoftmax" else got.sum
    sums = reduce(axis=(1, 2, 3)) if opset < 13 else reduce(axis=-1)
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)


def test_unused_extra_outputs_are_allowed_and_used_ones_computed() -> None:
    x = np.random.default_rng(3).standard_normal((2, 4, 6)).astype(np.float32)
    scale, bias = np.full(6, 1.5, np.float32), np.full(6, 0.25, np.float32)
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]),
             helper.make_node("LayerNormalization", ["d", "scale", "bias"], ["y", "mean", "inv_std"], axis=-1),
             helper.make_node("MaxPool", ["y"], ["p", "indices"], kernel_shape=[2])]
    assert_matches(model(nodes, {"x": x}, ["p"], {"scale": scale, "bias": bias}), {"x": x})
    # the normalisation statistics, asked for as graph outputs, are computed and right
    assert_matches(model(nodes[:2], {"x": x}, ["y", "mean", "inv_std", "mask"], {"scale": scale, "bias": bias}),
                   {"x": x})
    # MaxPool's indices, when read, are computed (they index the flattened input, as onnxruntime's)
    assert_matches(model(nodes, {"x": x}, ["p", "indices"], {"scale": scale, "bias": bias}), {"x": x})
    # an output an op cannot produce is refused at load, naming the op
    extra = [helper.make_node("Reshape", ["x", "shape"], ["r", "r2"])]
    with pytest.raises(UnsupportedOpError, match="Reshape.*output 1"):
        native(model(extra, {"x": x}, ["r2"], {"shape": np.array([-1], np.int64)}), {"x": x})


def test_training_modes_are_refused_never_ignored() -> None:
    x = np.random.default_rng(4).standard_normal((2, 3, 4)).astype(np.float32)
    stats = {n: np.ones(3, np.float32) for n in ("s", "b", "m", "v")}
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)
    with pytest.raises(UnsupportedOpError, match="BatchNormalization.*training_mode"):
        native(model([bn], {"x": x}, ["y"], stats, opset=15), {"x": x})
    dropout = helper.make_node("Dropout", ["x", "", "training"], ["y"])
    proto = model([dropout], {"x": x, "training": np.array(True)}, ["y"], {})
    with pytest.raises(UnsupportedOpError, match="Dropout.*training_mode"):
        native(proto, {"x": x, "training": np.array(True)})
    np.testing.assert_array_equal(native(proto, {"x": x, "training": np.array(False)})[0], x)


def test_dtypes_are_kept() -> None:
    """Shape plumbing stays int64, a float16 cast stays float16, a comparison is bool."""
    x = np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float32)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "index"], ["dim"], axis=0),
             helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16),
             helper.make_node("Greater", ["x", "zero"], ["positive"]),
             helper.make_node("Where", ["positive", "x", "zero"], ["relu"]),
             helper.make_node("ConstantOfShape", ["shape"], ["fill"],
                              value=numpy_helper.from_array(np.array([7], np.int64)))]
    proto = model(nodes, {"x": x}, ["dim", "half", "positive", "relu", "fill"],
                  {"index": np.array(2, np.int64), "zero": np.array(0, np.float32)})
    got = assert_matches(proto, {"x": x})
    assert [g.dtype for g in got] == [np.int64, np.float16, np.bool_, np.float32, np.int64]


def test_slice_expand_gather_elements_range_lrn_match_onnxruntime() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 6, 5, 5)).astype(np.float32)
    consts = {"starts": np.array([5, 1], np.int64), "ends": np.array([-100, 4], np.int64),
              "axes": np.array([1, 3], np.int64), "steps": np.array([-2, 2], np.int64),
              "shape": np.array([3, 1, 1, 1, 1], np.int64), "idx": rng.integers(-5, 5, (2, 6, 5, 2)),
              "r0": np.array(1, np.int64), "r1": np.array(9, np.int64), "r2": np.array(3, np.int64)}
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"]),
             helper.make_node("Expand", ["s", "shape"], ["e"]),
             helper.make_node("GatherElements", ["x", "idx"], ["g"], axis=3),
             helper.make_node("Range", ["r0", "r1", "r2"], ["r"]),
             helper.make_node("LRN", ["x"], ["l"], size=3, alpha=1e-3, beta=0.75, bias=2.0),
             helper.make_node("HardSwish", ["x"], ["h"]), helper.make_node("HardSigmoid", ["x"], ["hs"]),
             helper.make_node("Sum", ["x", "l", "h"], ["sum"])]
    assert_matches(model(nodes, {"x": x}, ["e", "g", "r", "sum", "hs"], consts), {"x": x})


def test_older_opsets_take_operands_from_attributes() -> None:
    """Axes, split sizes, slice bounds and clip bounds were attributes before they became inputs."""
    x = np.random.default_rng(7).standard_normal((2, 6, 4)).astype(np.float32)
    nodes = [helper.make_node("Slice", ["x"], ["s"], starts=[1, 0], ends=[5, 3], axes=[1, 2]),
             helper.make_node("ReduceMean", ["s"], ["m"], axes=[2], keepdims=0),
             helper.make_node("Unsqueeze", ["m"], ["u"], axes=[0]),
             helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[2, 4]),
             helper.make_node("Clip", ["b"], ["c"], min=-0.5, max=0.5),
             helper.make_node("Squeeze", ["u"], ["q"], axes=[0]),
             helper.make_node("Softmax", ["x"], ["p"])]
    assert_matches(model(nodes, {"x": x}, ["q", "a", "c", "p"], {}, opset=9), {"x": x})


@pytest.mark.parametrize("attrs", [
    {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
    {"strides": [3, 2], "dilations": [2, 1], "group": 2},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [2, 3], "auto_pad": "SAME_LOWER", "group": 4},
    {"strides": [2, 2], "output_shape": [12, 11]},
], ids=lambda a: "-".join(a))
def test_conv_transpose_matches_onnxruntime(attrs: Dict[str, Any]) -> None:
    rng = np.random.default_rng(8)
    group = attrs.get("group", 1)
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)  # 3 output channels per group
    bias = rng.standard_normal(weight.shape[1] * group).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)
    assert_matches(model([node], {"x": x}, ["y"], {"w": weight, "b": bias}), {"x": x}, atol=1e-4)


@pytest.mark.parametrize("attrs,scales,sizes", [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, [1, 1, 2, 2], None),
    ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [1, 1, 2, 3], None),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None, [2, 3, 9, 4]),
    ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel"}, [1, 1, 0.5, 1.7], None),
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, None, [2, 3, 3, 11]),
], ids=["nearest-x2", "bilinear-pytorch", "align-corners-sizes", "nearest-down", "linear-sizes"])
def test_resize_matches_onnxruntime(attrs: Dict[str, Any], scales: Any, sizes: Any) -> None:
    """The forms torch.nn.Upsample / F.interpolate export."""
    x = np.random.default_rng(9).standard_normal((2, 3, 6, 5)).astype(np.float32)
    extra = {"scales": np.array(scales, np.float32)} if scales else {"sizes": np.array(sizes, np.int64)}
    names = ["x", "", "scales"] if scales else ["x", "", "", "sizes"]
    node = helper.make_node("Resize", names, ["y"], **attrs)
    assert_matches(model([node], {"x": x}, ["y"], extra, opset=13), {"x": x})
