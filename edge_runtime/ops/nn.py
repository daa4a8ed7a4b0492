"""Network-layer ops: pooling, normalisation, softmax, Dropout, and Gemm/MatMul/Conv between
activations (the weight-initializer forms are graph.WeightLayer). Inference semantics only: a node
asking for training behaviour is refused, never computed as if it had not asked."""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import numpy as np

from edge_runtime.conv import conv_op, conv_transpose_op
from edge_runtime.errors import UnsupportedOpError
from edge_runtime.ops.base import Inputs, axis_of, opset_of, optional, output_used, same_dtype
from edge_runtime.windows import resolve_pads, windows


def _pool_params(op: str, x: np.ndarray, attrs: Dict[str, Any]):
    kernel = [int(k) for k in attrs["kernel_shape"]]
    rank = len(kernel)
    strides = [int(s) for s in attrs.get("strides", [1] * rank)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * rank)]
    pads = resolve_pads(op, attrs, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads, bool(attrs.get("ceil_mode", 0))


def _lowest(dtype: np.dtype) -> Any:
    return -np.inf if dtype.kind == "f" else np.iinfo(dtype).min


def max_pool(inputs: Inputs, attrs: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """The maxima, and their int64 indices into the flattened input (spatial order row-major, or
    column-major with ``storage_order=1``; the first maximum of a window wins a tie)."""
    x = inputs[0]
    kernel, strides, dilations, pads, ceil = _pool_params("MaxPool", x, attrs)
    rank = len(kernel)
    view, out = windows(x, kernel, strides, pads, dilations, ceil, pad_value=_lowest(x.dtype))
    values = view.max(axis=tuple(range(-rank, 0)))
    if not output_used(attrs, 1):
        return values, None
    taps = np.unravel_index(view.reshape(*view.shape[:-rank], -1).argmax(axis=-1), kernel)
    spatial = x.shape[2:]
    positions = [np.arange(n).reshape([-1 if j == i else 1 for j in range(rank)]) * strides[i] - pads[i]
                 + taps[i] * dilations[i] for i, n in enumerate(out)]
    order = "F" if attrs.get("storage_order", 0) else "C"
    inner = np.ravel_multi_index(positions, spatial, order=order)
    lead = np.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *([1] * rank))
    return values, (lead * int(np.prod(spatial)) + inner).astype(np.int64)


def average_pool(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """Each window's sum over its count of cells: real ones, plus explicit pads when
    ``count_include_pad``; the cells ``ceil_mode`` adds past the end never count."""
    x = inputs[0]
    kernel, strides, dilations, pads, ceil = _pool_params("AveragePool", x, attrs)
    axes = tuple(range(-len(kernel), 0))
    view, _ = windows(x, kernel, strides, pads, dilations, ceil)
    ones = np.ones(x.shape[2:], dtype=np.float32)
    include = 1.0 if attrs.get("count_include_pad", 0) else 0.0
    counts, _ = windows(ones, kernel, strides, pads, dilations, ceil, pad_value=include, extra_value=0.0)
    return same_dtype(view.sum(axis=axes, dtype=np.float64) / counts.sum(axis=axes), x)


def global_average_pool(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    return same_dtype(x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float32), x)


def global_max_pool(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


def _softmax_axes(x: np.ndarray, attrs: Dict[str, Any], op: str) -> Tuple[np.ndarray, Any, Tuple[int, ...]]:
    """Before opset 13 the op works on x coerced to 2-D at ``axis`` (default 1): the reduction runs over
    every axis from ``axis`` on. From 13 it is one axis, default -1."""
    if opset_of(attrs) >= 13:
        return x, axis_of(attrs.get("axis", -1), x.ndim, op), x.shape
    axis = axis_of(attrs.get("axis", 1), x.ndim, op) if x.ndim else 0
    flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    return flat, 1, x.shape


def softmax(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    data, axis, shape = _softmax_axes(inputs[0], attrs, "Softmax")
    shifted = np.exp(data - data.max(axis=axis, keepdims=True))
    return same_dtype(shifted / shifted.sum(axis=axis, keepdims=True), inputs[0]).reshape(shape)


def log_softmax(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    data, axis, shape = _softmax_axes(inputs[0], attrs, "LogSoftmax")
    shifted = data - data.max(axis=axis, keepdims=True)
    result = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return same_dtype(result, inputs[0]).reshape(shape)


def hardmax(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    data, axis, shape = _softmax_axes(inputs[0], attrs, "Hardmax")
    first = np.expand_dims(np.argmax(data, axis=axis), axis)
    result = np.zeros_like(data)
    np.put_along_axis(result, first, 1, axis=axis)
    return result.reshape(shape)


def check_batch_normalization(attrs: Dict[str, Any]) -> None:
    """Training-mode BatchNormalization normalises by the batch's own statistics: refused."""
    if attrs.get("training_mode", 0):
        raise UnsupportedOpError("BatchNormalization", "training_mode=1 (batch statistics)")
    if opset_of(attrs) < 7 and not attrs.get("is_test", 0):
        raise UnsupportedOpError("BatchNormalization", "is_test=0 (training) in opset < 7")
    if opset_of(attrs) < 9 and not attrs.get("spatial", 1):
        raise UnsupportedOpError("BatchNormalization", "spatial=0")


def batch_normalization(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, scale, bias, mean, var = inputs[:5]
    check_batch_normalization(attrs)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
    return same_dtype(x * factor.reshape(shape) + (bias - mean * factor).reshape(shape), x)


def instance_normalization(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, scale, bias = inputs[:3]
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean) / np.sqrt(var + attrs.get("epsilon", 1e-5)) * scale.reshape(shape) + bias.reshape(shape)
    return same_dtype(y, x)


def layer_normalization(inputs: Inputs, attrs: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, and the Mean and InvStdDev outputs (computed in float32, ONNX's default stash_type)."""
    x, scale, bias = inputs[0], inputs[1], optional(inputs, 2)
    if attrs.get("stash_type", 1) != 1:
        raise UnsupportedOpError("LayerNormalization", f"stash_type={attrs['stash_type']}")
    axes = tuple(range(axis_of(attrs.get("axis", -1), x.ndim, "LayerNormalization"), x.ndim))
    data = x.astype(np.float32)
    mean = data.mean(axis=axes, keepdims=True)
    centred = data - mean
    inv_std = 1 / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + attrs.get("epsilon", 1e-5))
    y = centred * inv_std * scale
    return same_dtype(y + bias if bias is not None else y, x), mean, inv_std


def lrn(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """x / (bias + alpha/size * sum of squares over the ``size`` neighbouring channels) ** beta."""
    x = inputs[0]
    size = int(attrs["size"])
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = np.square(x.astype(np.float64))
    padded = np.pad(squares, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    cumulative = np.concatenate([np.zeros_like(padded[:, :1]), np.cumsum(padded, axis=1)], axis=1)
    window = cumulative[:, size:] - cumulative[:, :-size]
    return same_dtype(x / (bias + alpha / size * window) ** beta, x)


def check_dropout(attrs: Dict[str, Any]) -> None:
    if opset_of(attrs) < 7 and not attrs.get("is_test", 0):
        raise UnsupportedOpError("Dropout", "is_test=0 (training) in opset < 7")


def dropout(inputs: Inputs, attrs: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """Identity at inference, and the all-true mask. Training (attribute before opset 12, input after)
    is refused: dropping random units is not what a deployed model should do silently."""
    x = inputs[0]
    training = optional(inputs, 2) if opset_of(attrs) >= 12 else None
    ratio = optional(inputs, 1) if opset_of(attrs) >= 12 else attrs.get("ratio", 0.5)
    dropping = ratio is None or float(np.asarray(ratio).reshape(-1)[0]) != 0.0  # omitted: 0.5
    if training is not None and bool(np.asarray(training).reshape(-1)[0]) and dropping:
        raise UnsupportedOpError("Dropout", "training_mode=True with a non-zero ratio")
    check_dropout(attrs)
    return x, np.ones(x.shape, dtype=np.bool_) if output_used(attrs, 1) else None


def gemm(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """Gemm between activations (no weight initializer): plain numpy, in the inputs' dtype."""
    a, b, c = inputs[0], inputs[1], optional(inputs, 2)
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    y = a @ b
    y = y * np.asarray(alpha, dtype=y.dtype) if alpha != 1.0 else y
    if c is not None:
        y = y + (c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c)
    return same_dtype(y, inputs[0])


OPS: Dict[str, Callable[[Inputs, Dict[str, Any]], Any]] = {
    "MaxPool": max_pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool,
    "Softmax": softmax,
    "LogSoftmax": log_softmax,
    "Hardmax": hardmax,
    "BatchNormalization": batch_normalization,
    "InstanceNormalization": instance_normalization,
    "LayerNormalization": layer_normalization,
    "LRN": lrn,
    "Dropout": dropout,
    "Gemm": gemm,
    "MatMul": lambda i, a: np.matmul(i[0], i[1]),
    "Conv": conv_op,
    "ConvTranspose": conv_transpose_op,
}
OUTPUTS: Dict[str, int] = {"LayerNormalization": 3, "Dropout": 2, "MaxPool": 2}
# Attribute checks that need no input values: run at load, so such a node is refused before anything runs.
CHECKS: Dict[str, Callable[[Dict[str, Any]], None]] = {
    "BatchNormalization": check_batch_normalization,
    "Dropout": check_dropout,
}
