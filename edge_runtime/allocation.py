"""How big an op's output will be, known before it runs: a model may not allocate past the limit.

A 178-byte ONNX file (``ConstantOfShape([805306368])`` → ReduceSum) asked for 3.2 GB; so can Expand,
Tile, Range, Resize, OneHot, Pad, a broadcast of two small constants ([30000, 1] + [1, 30000]), a Gather
of many indices, a Concat of one tensor listed a thousand times, or a Conv whose pads make its im2col
columns huge. Every intermediate is held to ``EDGEPRUNE_MAX_MODEL_BYTES`` (the bound on a model's own
tensors) twice:

- at load (``check_graph``), for every engine, onnxruntime's included: the graph is walked with the
  declared input shapes (free axes, the batch, counted as 1) and the model's constants; small values
  (shapes, axes, counts) are computed as the graph would compute them, so sizes that come from
  constants or input shapes are known, and what exceeds the limit is refused in one line before
  anything runs;
- at run time (``check_op``), in the native executor, right before each op allocates its output: sizes
  that depend on input values or on the batch are checked there.

At load every free axis counts as 1 and a tensor whose shape cannot be told counts as one element: sizes
are lower bounds, so a model is refused only when even batch 1 certainly asks for too much.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, ModelDirError
from edge_runtime.model_format import max_model_bytes
from edge_runtime.ops.base import Attrs, attr_tensor, opset_of

Shape = Optional[Tuple[int, ...]]   # None: not known here
FOLD_ELEMENTS = 1 << 16    # values this small are computed at load (shapes, axes, counts: never activations)
BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Pow", "Sum", "Max", "Min", "Mean", "Equal",
                           "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift",
                           "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Where", "PRelu"})
SAME_SHAPE_OPS = frozenset({"Identity", "Cast", "CastLike", "Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Log",
                            "Sqrt", "Erf", "Gelu", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Clip",
                            "Softmax", "LogSoftmax", "BatchNormalization", "Dropout", "Not", "Floor", "Ceil",
                            "Round", "Reciprocal", "Sign", "LayerNormalization", "InstanceNormalization"})


def _dims(shape: Shape) -> List[int]:
    """Each length (none when the shape is not known)."""
    return [] if shape is None else [max(int(d), 0) for d in shape]


def elements(shape: Shape) -> int:
    """The least number of elements a tensor of ``shape`` holds."""
    return 1 if shape is None else math.prod([max(int(d), 0) for d in shape])


def _ints(value: Optional[np.ndarray]) -> Optional[List[int]]:
    """A shape/count tensor's values as the ops read them (``int()`` of each: floats too), or None."""
    if value is None or value.size > FOLD_ELEMENTS or value.dtype.kind not in "iubf":
        return None
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        return None
    return [int(v) for v in value.reshape(-1)]


def _broadcast(shapes: Sequence[Shape]) -> Shape:
    """Two-way (numpy) broadcasting of the shapes that are known (None when none is)."""
    known = [_dims(s) for s in shapes if s is not None]
    if not known:
        return None
    rank = max(len(s) for s in known)
    padded = [[1] * (rank - len(s)) + s for s in known]
    return tuple(max(lengths) if min(lengths) else 0 for lengths in zip(*padded))


def _value_shape(shapes: Sequence[Shape], values: Sequence[Optional[np.ndarray]], index: int) -> Shape:
    """A shape given as a tensor (ConstantOfShape, Expand): its values, when known."""
    dims = _ints(values[index]) if index < len(values) else None
    return None if dims is None else tuple(max(d, 0) for d in dims)


def _constant_of_shape(shapes, values, attrs) -> Shape:
    return _value_shape(shapes, values, 0)


def _expand(shapes, values, attrs) -> Shape:
    target = _value_shape(shapes, values, 1)
    return None if target is None else _broadcast([shapes[0] or (), target])


def _tile(shapes, values, attrs) -> Shape:
    repeats = _ints(values[1]) if len(values) > 1 else None
    if repeats is None:
        return None
    base = _dims(shapes[0]) if shapes[0] is not None and len(shapes[0]) == len(repeats) else [1] * len(repeats)
    return tuple(d * max(r, 0) for d, r in zip(base, repeats))


def _range(shapes, values, attrs) -> Shape:
    if len(values) < 3 or any(v is None or v.size != 1 for v in values[:3]):
        return None
    start, limit, delta = (float(v.reshape(-1)[0]) for v in values[:3])
    if not delta or not all(math.isfinite(x) for x in (start, limit, delta)):
        return None
    return (max(int(math.ceil((limit - start) / delta)), 0),)


def _one_hot(shapes, values, attrs) -> Shape:
    depth = values[1] if len(values) > 1 else None
    if depth is None or depth.size != 1 or not np.isfinite(depth).all():
        return None
    return (*(shapes[0] or ()), max(int(depth.reshape(-1)[0]), 0))


def _top_k(shapes, values, attrs) -> Shape:
    k = _ints(values[1]) if len(values) > 1 else None
    if not k or shapes[0] is None or not shapes[0]:
        return None
    axis = int(attrs.get("axis", -1)) % len(shapes[0])
    return tuple(max(k[0], 0) if a == axis else d for a, d in enumerate(shapes[0]))


def _pad(shapes, values, attrs) -> Shape:
    if opset_of(attrs) < 11:
        pads = [int(p) for p in attrs.get("pads", [])]
    else:
        pads = _ints(values[1]) if len(values) > 1 else None
    if not pads or len(pads) % 2:
        return None
    axes = _ints(values[3]) if opset_of(attrs) >= 11 and len(values) > 3 else None
    half = len(pads) // 2
    base = _dims(shapes[0]) if shapes[0] is not None else [1] * (half if axes is None else max(half, 1))
    for i, axis in enumerate(axes if axes is not None else range(half)):
        if -len(base) <= axis < len(base):
            base[axis] = max(base[axis] + pads[i] + pads[i + half], 0)
    return tuple(base)


def _resize(shapes, values, attrs) -> Shape:
    if opset_of(attrs) < 11:
        scales = attrs.get("scales") if "scales" in attrs else values[1] if len(values) > 1 else None
        sizes = None
    else:
        scales = values[2] if len(values) > 2 and values[2] is not None and values[2].size else None
        sizes = _ints(values[3]) if len(values) > 3 else None
    if "axes" in attrs:
        return None
    if sizes is not None:
        return tuple(max(s, 0) for s in sizes)
    scales = None if scales is None else np.asarray(scales, dtype=np.float64).reshape(-1)
    if scales is None or scales.size > FOLD_ELEMENTS or not np.isfinite(scales).all():
        return None
    base = _dims(shapes[0]) if shapes[0] is not None and len(shapes[0]) == scales.size else [1] * scales.size
    return tuple(max(int(d * float(s)), 0) for d, s in zip(base, scales))


def _gather(shapes, values, attrs) -> Shape:
    data, indices = shapes[0], shapes[1] if len(shapes) > 1 else None
    if data is None or not data:
        return None
    axis = int(attrs.get("axis", 0))
    if not -len(data) <= axis < len(data):
        return None
    axis %= len(data)
    return (*data[:axis], *(indices or ()), *data[axis + 1:])


def _concat(shapes, values, attrs) -> Shape:
    known = [s for s in shapes if s is not None and s]
    if not known:
        return None
    axis = int(attrs.get("axis", 0))
    if not all(-len(s) <= axis < len(s) for s in known):
        return None
    axis %= len(known[0])
    total = sum(_dims(s)[axis] if axis < len(s) else 1 for s in shapes if s is not None and s)
    return tuple(total if a == axis else d for a, d in enumerate(known[0]))


def _matmul(shapes, values, attrs) -> Shape:
    a, b = shapes[0], shapes[1] if len(shapes) > 1 else None
    if a is None or b is None or not a or not b:
        return None
    batch = _broadcast([a[:-2], b[:-2]]) or ()
    rows = (a[-2],) if len(a) > 1 else ()
    cols = (b[-1],) if len(b) > 1 else ()
    return (*batch, *rows, *cols)


def _gemm(shapes, values, attrs) -> Shape:
    a, b = shapes[0], shapes[1] if len(shapes) > 1 else None
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    return (a[1] if attrs.get("transA", 0) else a[0], b[0] if attrs.get("transB", 0) else b[1])


def _window(shapes, values, attrs, weight: Shape = None) -> Shape:
    """Conv / pools: [N, C_out, *out] with out from the input length, pads, kernel, stride, dilation."""
    x = shapes[0]
    kernel = attrs.get("kernel_shape") or (list(weight[2:]) if weight is not None else None)
    if x is None or len(x) < 3 or kernel is None or len(kernel) != len(x) - 2:
        return None
    rank = len(kernel)
    strides = [max(int(s), 1) for s in attrs.get("strides", [1] * rank)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * rank)]
    pads = [int(p) for p in attrs.get("pads", [0] * 2 * rank)]
    pads = pads if len(pads) == 2 * rank else [0] * 2 * rank
    same = str(attrs.get("auto_pad", "NOTSET")).startswith("SAME")
    out = []
    for i, (n, k, s, d) in enumerate(zip(x[2:], kernel, strides, dilations)):
        span = n + pads[i] + pads[i + rank] - (int(k) - 1) * d - 1
        out.append(-(-n // s) if same else max(span // s + 1 + bool(attrs.get("ceil_mode", 0)), 0))
    return (x[0], weight[0] if weight is not None else x[1], *out)


def _conv(shapes, values, attrs) -> Shape:
    return _window(shapes, values, attrs, shapes[1] if len(shapes) > 1 else None)


def conv_columns(x: Shape, weight: Shape, attrs: Mapping[str, Any]) -> int:
    """Elements of a Conv's im2col columns ([C·k, N·out]): larger than its output when kernels are big."""
    out = _window([x], [], attrs, weight)
    if out is None or weight is None or len(weight) < 3:
        return 0
    groups = max(int(attrs.get("group", 1)), 1)
    return elements(out) // max(elements(weight[:1]), 1) * elements(weight[1:]) * groups


def _conv_transpose(shapes, values, attrs) -> Shape:
    x, weight = shapes[0], shapes[1] if len(shapes) > 1 else None
    if x is None or weight is None or len(x) < 3 or len(weight) != len(x):
        return None
    rank = len(x) - 2
    if attrs.get("output_shape"):
        spatial = [int(v) for v in attrs["output_shape"]][-rank:]
    else:
        kernel = attrs.get("kernel_shape") or weight[2:]
        strides = attrs.get("strides", [1] * rank)
        dilations = attrs.get("dilations", [1] * rank)
        extra = attrs.get("output_padding", [0] * rank)
        spatial = [int(s) * (n - 1) + int(e) + (int(k) - 1) * int(d) + 1
                   for n, k, s, d, e in zip(x[2:], kernel, strides, dilations, extra)]
    return (x[0], weight[1] * max(int(attrs.get("group", 1)), 1), *spatial)


def _einsum(shapes, values, attrs) -> Shape:
    equation = str(attrs.get("equation", "")).replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if not arrow or "." in equation or len(terms) != len(shapes):
        return None
    lengths: Dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        if shape is not None and len(shape) == len(term):
            for label, d in zip(term, shape):
                lengths[label] = max(lengths.get(label, 1), int(d))
    return tuple(lengths.get(label, 1) for label in output)


ESTIMATES: Dict[str, Callable[[Sequence[Shape], Sequence[Optional[np.ndarray]], Mapping[str, Any]], Shape]] = {
    "ConstantOfShape": _constant_of_shape, "Expand": _expand, "Tile": _tile, "Range": _range,
    "OneHot": _one_hot, "TopK": _top_k, "Pad": _pad, "Resize": _resize, "Upsample": _resize,
    "Gather": _gather, "Concat": _concat, "MatMul": _matmul, "Gemm": _gemm, "Einsum": _einsum,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _window, "AveragePool": _window,
    **{op: (lambda shapes, values, attrs: _broadcast(shapes)) for op in BROADCAST_OPS},
}


def _itemsize(op: str, values: Sequence[Optional[np.ndarray]], attrs: Mapping[str, Any],
              dtypes: Sequence[Optional[np.dtype]]) -> int:
    """Bytes per element of the output (1 when it cannot be told: a lower bound, like the sizes)."""
    if op == "ConstantOfShape":
        return attr_tensor(attrs["value"]).dtype.itemsize if "value" in attrs else 4
    if op in ("Range", "Where", "OneHot"):
        index = {"Range": 0, "Where": 1, "OneHot": 2}[op]
        return dtypes[index].itemsize if len(dtypes) > index and dtypes[index] is not None else 1
    return dtypes[0].itemsize if dtypes and dtypes[0] is not None else 1


def estimate(op: str, shapes: Sequence[Shape], values: Sequence[Optional[np.ndarray]], attrs: Mapping[str, Any],
             dtypes: Sequence[Optional[np.dtype]] = ()) -> Tuple[Shape, int]:
    """The output's shape (None when it cannot be told) and at least how many bytes it takes; a Conv's
    im2col columns count too. Never raises: a malformed node is the op's own error when it runs."""
    estimator = ESTIMATES.get(op)
    if estimator is None:
        return None, 0
    try:
        shape = estimator(shapes, values, attrs)
        nbytes = elements(shape) * _itemsize(op, values, attrs, dtypes)
        if op == "Conv" and len(shapes) > 1:
            nbytes = max(nbytes, conv_columns(shapes[0], shapes[1], attrs) * (dtypes[0].itemsize if dtypes and
                                                                               dtypes[0] is not None else 1))
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError, AttributeError, EdgeRuntimeError):
        return None, 0
    return shape, nbytes


def refuse(where: str, node: str, op: str, nbytes: int, when: str) -> ModelDirError:
    return ModelDirError(f"{where}: node {node} ({op}) would allocate {nbytes:,} bytes {when}, more than "
                         f"{max_model_bytes():,} (EDGEPRUNE_MAX_MODEL_BYTES)")


VALUE_DRIVEN = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "OneHot", "TopK", "Pad", "Resize",
                          "Upsample"})  # their output size comes from input values, not only shapes


def check_op(op: str, name: str, values: Sequence[Optional[np.ndarray]], attrs: Mapping[str, Any],
             where: str = "the model") -> None:
    """Run time, native executor: refuse an op whose output would exceed the limit, before it is made."""
    shapes = [None if v is None else v.shape for v in values]
    _, nbytes = estimate(op, shapes, values, attrs, [None if v is None else v.dtype for v in values])
    if nbytes > max_model_bytes():
        raise refuse(where, name, op, nbytes, "while running")


def op_guard(op: str, name: str, attrs: Mapping[str, Any]) -> Optional[Callable[[Sequence[Any]], None]]:
    """``check_op`` for one node, or None when its op cannot grow past its inputs. An op sized by its
    input shapes alone is checked once per shape (runs repeat the same shapes: no cost per call)."""
    if op not in ESTIMATES:
        return None
    if op in VALUE_DRIVEN:
        return lambda values: check_op(op, name, values, attrs)
    passed: set = set()

    def guard(values: Sequence[Optional[np.ndarray]]) -> None:
        shapes = tuple(None if v is None else v.shape for v in values)
        if shapes not in passed:
            check_op(op, name, values, attrs)
            passed.add(shapes)  # the limit is read once per shape: set it before loading
    return guard


class _Walk:
    """What is known about each tensor while ``check_graph`` walks the graph: small values, shapes, dtypes."""

    def __init__(self, weights: Any, specs: Sequence[Mapping[str, Any]]) -> None:
        self.weights = weights
        self.values: Dict[str, np.ndarray] = {}
        self.shapes: Dict[str, Shape] = {}
        self.dtypes: Dict[str, np.dtype] = {}
        for name, info in weights.tensors.items():
            self.shapes[name] = tuple(int(d) for d in info["shape"])
            self.dtypes[name] = np.dtype(info.get("dtype", "float32"))
        for spec in specs:
            self.shapes[spec["name"]] = (tuple(1 if isinstance(d, str) else int(d) for d in spec["shape"])
                                         if spec.get("rank_known", True) else None)  # free axes: batch 1
            self.dtypes[spec["name"]] = np.dtype(spec.get("dtype", "float32"))

    def value(self, name: str) -> Optional[np.ndarray]:
        """A tensor's value when it is small and known (a constant, or computed from constants)."""
        if name in self.values or name not in self.weights.tensors:
            return self.values.get(name)
        info = self.weights.tensors[name]
        if info.get("storage") == "csr" or elements(tuple(info["shape"])) > FOLD_ELEMENTS:
            return None
        try:
            self.values[name] = np.asarray(self.weights.dense(name))
        except (EdgeRuntimeError, OSError, ValueError):
            return None
        return self.values[name]


def check_graph(nodes: Sequence[Mapping[str, Any]], specs: Sequence[Mapping[str, Any]], weights: Any,
                opset: int, where: str, run_ops: Mapping[str, Callable] = None) -> None:
    """Load time, every engine: refuse a graph that would allocate more than the limit at batch 1.

    ``run_ops`` (``ops.OPS``) computes small values whose inputs are all known, as the graph would: a
    shape read from an input (its free axes as 1), gathered, concatenated, multiplied, handed to
    ConstantOfShape. Values over FOLD_ELEMENTS are never computed here.
    """
    walk = _Walk(weights, specs)
    limit = max_model_bytes()
    for index, node in enumerate(nodes):
        op, names = node["op_type"], [n for n in node["inputs"]]
        attrs = Attrs(node.get("attributes") or {}, op, opset, len(node["outputs"]))
        values = _known_values(walk, op, names)
        shapes = [walk.shapes.get(n) if n else None for n in names]
        dtypes = [walk.dtypes.get(n) if n else None for n in names]
        shape, nbytes = estimate(op, shapes, values, attrs, dtypes)
        if nbytes > limit:
            raise refuse(where, node.get("name") or f"{op}_{index}", op, nbytes, "at batch 1")
        _propagate(walk, node, attrs, shape, values, shapes, dtypes, run_ops or {})


SHAPE_ONLY_ESTIMATES = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "MatMul", "Gemm", "Einsum",
                                  *BROADCAST_OPS})  # their estimates read shapes, never values


def _known_values(walk: _Walk, op: str, names: Sequence[str]) -> List[Optional[np.ndarray]]:
    """The inputs' values where known. An op sized by shapes alone needs them only to be computed
    (``_propagate``: every input known), so they are looked up until the first unknown one: a Conv on
    an activation never decodes its weight here."""
    if op not in SHAPE_ONLY_ESTIMATES:
        return [walk.value(n) if n else None for n in names]
    values: List[Optional[np.ndarray]] = [None] * len(names)
    for index, name in enumerate(names):
        values[index] = walk.value(name) if name else None
        if name and values[index] is None:
            break
    return values


def _propagate(walk: _Walk, node: Mapping[str, Any], attrs: Attrs, shape: Shape,
               values: List[Optional[np.ndarray]], shapes: List[Shape], dtypes: list, run_ops: Mapping) -> None:
    """Record what the node's first output is: its value (when small and computable), else its shape."""
    op, out = node["op_type"], node["outputs"][0] if node["outputs"] else ""
    if not out:
        return
    if op == "Shape" and shapes and shapes[0] is not None:
        values = [np.broadcast_to(np.zeros((), np.int8), _dims(shapes[0]))]  # its shape, no bytes
    known = op in run_ops and all(v is not None for v, n in zip(values, node["inputs"]) if n)
    small = elements(shape) <= FOLD_ELEMENTS if shape is not None else op not in ESTIMATES
    if known and small:  # an op that could grow is computed only when its estimate says it stays small
        try:
            result = run_ops[op](values, attrs)
        except Exception:  # noqa: BLE001  (a malformed node fails the same way when the model runs)
            result = None
        result = result[0] if isinstance(result, tuple) else result
        result = None if result is None else np.asarray(result)  # as the executor keeps it (np.take: a scalar)
        if result is not None and result.dtype != object and result.size <= FOLD_ELEMENTS:
            walk.values[out], walk.shapes[out], walk.dtypes[out] = result, result.shape, result.dtype
            return
    if shape is None and op in SAME_SHAPE_OPS and shapes:
        shape = shapes[0]
    if shape is not None:
        walk.shapes[out] = shape
        walk.dtypes[out] = dtypes[0] if dtypes and op != "Shape" else None
