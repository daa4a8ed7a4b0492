"""The graph's non-weight operators in numpy, one function per ONNX op (inference semantics, opset 13+).

Each function takes the node's inputs (``None`` for an omitted optional input) and its attributes and
returns its first output. A node that needs an attribute value outside what is written here raises
UnsupportedOpError rather than computing something else.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
from scipy import special

from edge_runtime.errors import UnsupportedOpError
from edge_runtime.windows import resolve_pads, windows

Inputs = List[Optional[np.ndarray]]
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_,
               10: np.float16, 11: np.float64}


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _pool_params(op: str, x: np.ndarray, attrs: Dict[str, Any]):
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = resolve_pads(op, attrs, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads, bool(attrs.get("ceil_mode", 0))


def max_pool(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    if attrs.get("storage_order", 0):
        raise UnsupportedOpError("MaxPool", "storage_order=1")
    kernel, strides, dilations, pads, ceil = _pool_params("MaxPool", x, attrs)
    view, _ = windows(x, kernel, strides, pads, dilations, ceil, pad_value=-np.inf)
    return view.max(axis=tuple(range(-len(kernel), 0)))


def average_pool(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    kernel, strides, dilations, pads, ceil = _pool_params("AveragePool", x, attrs)
    rank = len(kernel)
    axes = tuple(range(-rank, 0))
    view, _ = windows(x, kernel, strides, pads, dilations, ceil)
    sums = view.sum(axis=axes)
    # Divide by the window's count of real cells (plus explicit pads with count_include_pad); the extra
    # cells that ceil_mode adds at the end never count.
    ones = np.ones(x.shape[2:], dtype=x.dtype)
    if attrs.get("count_include_pad", 0):
        ones = np.pad(ones, list(zip(pads[:rank], pads[rank:])), constant_values=1)
        pads = [0] * (2 * rank)
    counts, _ = windows(ones, kernel, strides, pads, dilations, ceil)
    return (sums / counts.sum(axis=axes)).astype(x.dtype)


def global_average_pool(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    return x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32).astype(x.dtype)


def global_max_pool(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


def flatten(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axis = _axis(attrs.get("axis", 1), x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def reshape(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, shape = inputs[0], [int(d) for d in inputs[1]]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def softmax(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axis = attrs.get("axis", -1)
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def log_softmax(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axis = attrs.get("axis", -1)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def batch_normalization(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, scale, bias, mean, var = inputs[:5]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
    return (x * factor.reshape(shape) + (bias - mean * factor).reshape(shape)).astype(x.dtype)


def layer_normalization(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, scale, bias = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None
    axes = tuple(range(_axis(attrs.get("axis", -1), x.ndim), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=axes, keepdims=True)
    y = centred / np.sqrt(var + attrs.get("epsilon", 1e-5)) * scale
    return (y + bias if bias is not None else y).astype(x.dtype)


def gelu(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    if attrs.get("approximate", "none") == "tanh":
        return (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))).astype(x.dtype)
    return (0.5 * x * (1 + special.erf(x / np.sqrt(2)))).astype(x.dtype)


def clip(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    if low is None and high is None:  # ONNX allows it (identity); numpy before 2.1 refuses np.clip(x, None, None)
        return inputs[0]
    return np.clip(inputs[0], low, high)


def squeeze(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(int(a) for a in axes))


def unsqueeze(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs["axes"]
    return np.expand_dims(inputs[0], tuple(int(a) for a in axes))


def reduce_mean(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    axes = tuple(range(x.ndim)) if axes is None or len(axes) == 0 else tuple(int(a) for a in axes)
    return x.mean(axis=axes, keepdims=bool(attrs.get("keepdims", 1))).astype(x.dtype)


def gemm_activations(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """Gemm between activations (no weight initializer): plain numpy."""
    a, b = inputs[0], inputs[1]
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + attrs.get("beta", 1.0) * inputs[2]
    return y.astype(np.float32)


def cast(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    to = attrs["to"]
    if to not in ONNX_DTYPES:
        raise UnsupportedOpError("Cast", f"to={to}")
    return inputs[0].astype(ONNX_DTYPES[to])


def _elementwise(fn: Callable[..., np.ndarray]) -> Callable[[Inputs, Dict[str, Any]], np.ndarray]:
    return lambda inputs, attrs: fn(*inputs)


OPS: Dict[str, Callable[[Inputs, Dict[str, Any]], np.ndarray]] = {
    "Relu": _elementwise(lambda x: np.maximum(x, 0, dtype=x.dtype)),
    "LeakyRelu": lambda i, a: np.where(i[0] > 0, i[0], i[0] * np.float32(a.get("alpha", 0.01))),
    "Sigmoid": _elementwise(lambda x: (1 / (1 + np.exp(-x))).astype(x.dtype)),
    "Tanh": _elementwise(np.tanh),
    "Erf": _elementwise(lambda x: special.erf(x).astype(x.dtype)),
    "Gelu": gelu,
    "Clip": clip,
    "Exp": _elementwise(np.exp),
    "Sqrt": _elementwise(np.sqrt),
    "Neg": _elementwise(np.negative),
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Div": _elementwise(lambda a, b: (a / b).astype(np.result_type(a, b))),
    "Pow": _elementwise(lambda a, b: np.power(a, b).astype(a.dtype)),
    "Identity": _elementwise(lambda x: x),
    "Dropout": lambda i, a: i[0],
    "MatMul": _elementwise(np.matmul),
    "Gemm": gemm_activations,
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool,
    "Flatten": flatten,
    "Reshape": reshape,
    "Transpose": lambda i, a: np.transpose(i[0], a.get("perm")),
    "Softmax": softmax,
    "LogSoftmax": log_softmax,
    "Concat": lambda i, a: np.concatenate([x for x in i if x is not None], axis=a["axis"]),
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Shape": lambda i, a: np.array(i[0].shape[a.get("start", 0):a.get("end")], dtype=np.int64),
    "Gather": lambda i, a: np.take(i[0], i[1], axis=a.get("axis", 0)),
    "Cast": cast,
    "BatchNormalization": batch_normalization,
    "LayerNormalization": layer_normalization,
    "ReduceMean": reduce_mean,
}
