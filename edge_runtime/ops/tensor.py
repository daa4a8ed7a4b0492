"""Shape and indexing ops: the integer plumbing between layers (Shape → Gather → Concat → Reshape,
Slice, Expand, ...). They move data without arithmetic, so they work for every dtype."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from edge_runtime.errors import UnsupportedOpError
from edge_runtime.ops.base import (Inputs, attr_tensor, axis_of, ints, is_native, numpy_dtype, operand,
                                   opset_of, optional)


def reshape(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    shape = ints(operand(inputs, 1, attrs, "shape", 5))
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def flatten(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis  # Flatten's axis runs over [-r, r]
    # both sizes spelled out: numpy cannot infer -1 beside a 0 (an empty batch)
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), int(np.prod(x.shape[axis:], dtype=np.int64)))


def squeeze(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axes = operand(inputs, 1, attrs, "axes", 13)
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(ints(axes)))


def unsqueeze(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    axes = ints(operand(inputs, 1, attrs, "axes", 13))
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(axis_of(a, rank, "Unsqueeze") for a in axes))) if axes else x


def shape(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    dims = inputs[0].shape
    start, end = attrs.get("start", 0), attrs.get("end")
    return np.array(dims[start:end], dtype=np.int64)


def concat(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    parts = [x for x in inputs if x is not None]
    return np.concatenate(parts, axis=axis_of(attrs["axis"], parts[0].ndim, "Concat"))


def gather(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, indices = inputs[0], inputs[1]
    return np.take(x, indices.astype(np.int64), axis=axis_of(attrs.get("axis", 0), x.ndim, "Gather"))


def gather_elements(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, indices = inputs[0], inputs[1].astype(np.int64)
    axis = axis_of(attrs.get("axis", 0), x.ndim, "GatherElements")
    indices = np.where(indices < 0, indices + x.shape[axis], indices)  # ONNX allows negative indices
    return np.take_along_axis(x, indices, axis=axis)


def _slice_params(inputs: Inputs, attrs: Dict[str, Any]) -> Tuple[List[int], ...]:
    if opset_of(attrs) < 10:
        starts, ends = ints(attrs["starts"]), ints(attrs["ends"])
        axes = ints(attrs["axes"]) if "axes" in attrs else list(range(len(starts)))
        return starts, ends, axes, [1] * len(starts)
    starts, ends = ints(inputs[1]), ints(inputs[2])
    axes = ints(inputs[3]) if optional(inputs, 3) is not None else list(range(len(starts)))
    steps = ints(inputs[4]) if optional(inputs, 4) is not None else [1] * len(starts)
    return starts, ends, axes, steps


def slice_(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """ONNX clamps start/end per step sign; a negative step's end may be "before index 0", which a
    Python slice can only say as ``None``."""
    x = inputs[0]
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(*_slice_params(inputs, attrs)):
        if step == 0:
            raise UnsupportedOpError("Slice", "step 0")
        axis = axis_of(axis, x.ndim, "Slice")
        dim = x.shape[axis]
        start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index[axis] = slice(start, None if end < 0 else end, step)
    return x[tuple(index)]


def split(inputs: Inputs, attrs: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
    x = inputs[0]
    axis = axis_of(attrs.get("axis", 0), x.ndim, "Split")
    sizes = operand(inputs, 1, attrs, "split", 13)
    count = getattr(attrs, "outputs", 1)
    dim = x.shape[axis]
    if sizes is not None:
        sizes = ints(sizes)
    elif "num_outputs" in attrs:  # opset 18: equal chunks of ceil(dim / n), the last one smaller
        chunk = math.ceil(dim / int(attrs["num_outputs"]))
        sizes = [min(chunk, dim - i * chunk) for i in range(int(attrs["num_outputs"]))]
    else:
        if dim % count:
            raise UnsupportedOpError("Split", f"axis of size {dim} into {count} equal parts")
        sizes = [dim // count] * count
    cuts = np.cumsum(sizes)[:-1]
    return tuple(np.split(x, cuts, axis=axis))


def expand(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    target = np.broadcast_shapes(x.shape, tuple(ints(inputs[1])))  # ONNX: two-way broadcast
    return np.array(np.broadcast_to(x, target))


def tile(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    return np.tile(inputs[0], ints(inputs[1]))


def constant_of_shape(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    value = attr_tensor(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    return np.full(tuple(ints(inputs[0])), value.reshape(-1)[0], dtype=value.dtype)


def constant(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    if "value" in attrs:
        return attr_tensor(attrs["value"])
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in attrs:
            return np.array(attrs[name], dtype=dtype)
    raise UnsupportedOpError("Constant", f"attribute {', '.join(attrs) or '(none)'}")


def range_(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    count = max(int(math.ceil((float(limit) - float(start)) / float(delta))), 0)
    if start.dtype.kind in "iu":  # exact integer arithmetic, no float rounding of large values
        return (int(start) + int(delta) * np.arange(count, dtype=np.int64)).astype(start.dtype)
    return (start + delta * np.arange(count, dtype=start.dtype)).astype(start.dtype)


def cast(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    if not is_native(x.dtype):
        raise UnsupportedOpError("Cast", f"input of dtype {x.dtype}")
    return x.astype(numpy_dtype(int(attrs["to"]), "Cast"))


def cast_like(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    if not is_native(inputs[0].dtype) or not is_native(inputs[1].dtype):
        raise UnsupportedOpError("CastLike", f"dtype {inputs[0].dtype} → {inputs[1].dtype}")
    return inputs[0].astype(inputs[1].dtype)


PAD_MODES = ("constant", "reflect", "edge", "wrap")


def check_pad(attrs: Dict[str, Any]) -> None:
    if attrs.get("mode", "constant") not in PAD_MODES:
        raise UnsupportedOpError("Pad", f"mode={attrs['mode']!r}")


def pad(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    """constant/reflect/edge/wrap padding; negative pads crop."""
    x = inputs[0]
    check_pad(attrs)
    mode = attrs.get("mode", "constant")
    if opset_of(attrs) < 11:
        pads, value, axes = ints(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        pads = ints(inputs[1])
        value = optional(inputs, 2)
        value = 0 if value is None or value.size == 0 else value.reshape(-1)[0]
        axes = ints(inputs[3]) if optional(inputs, 3) is not None else None
    axes = list(range(x.ndim)) if axes is None else [axis_of(a, x.ndim, "Pad") for a in axes]
    widths = [[0, 0] for _ in range(x.ndim)]
    for i, axis in enumerate(axes):
        widths[axis] = [pads[i], pads[i + len(axes)]]
    crop = tuple(slice(-min(b, 0), x.shape[a] + min(e, 0)) for a, (b, e) in enumerate(widths))
    x = x[crop]
    widths = [(max(b, 0), max(e, 0)) for b, e in widths]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(value).astype(x.dtype))
    return np.pad(x, widths, mode=mode)


def trilu(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, k = inputs[0], optional(inputs, 1)
    k = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
    return np.triu(x, k) if attrs.get("upper", 1) else np.tril(x, k)


def depth_to_space(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    n, c, h, w = x.shape
    b = int(attrs["blocksize"])
    mode = attrs.get("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise UnsupportedOpError("DepthToSpace", f"mode={mode!r}")
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    n, c, h, w = x.shape
    b = int(attrs["blocksize"])
    mode = attrs.get("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise UnsupportedOpError("SpaceToDepth", f"mode={mode!r}")
    order = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(order)
    return y.reshape(n, c * b * b, h // b, w // b)


def one_hot(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    indices, depth, values = inputs[0], int(np.asarray(inputs[1]).reshape(-1)[0]), inputs[2]
    axis = axis_of(attrs.get("axis", -1), indices.ndim + 1, "OneHot")
    index = indices.astype(np.int64)
    index = np.where(index < 0, index + depth, index)
    hot = np.expand_dims(index, axis) == np.arange(depth).reshape([-1 if i == axis else 1
                                                                    for i in range(indices.ndim + 1)])
    return np.where(hot, values[1], values[0]).astype(values.dtype)


def top_k(inputs: Inputs, attrs: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """Values and int64 indices; ties go to the lower index, as ONNX specifies."""
    x, k = inputs[0], int(np.asarray(inputs[1]).reshape(-1)[0])
    axis = axis_of(attrs.get("axis", -1), x.ndim, "TopK")
    if not attrs.get("sorted", 1):
        raise UnsupportedOpError("TopK", "sorted=0")
    keys = -x if attrs.get("largest", 1) else x
    if x.dtype.kind == "u" and attrs.get("largest", 1):
        keys = np.iinfo(x.dtype).max - x
    order = np.argsort(keys, axis=axis, kind="stable")
    index = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, index, axis=axis), index.astype(np.int64)


def einsum(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    return np.asarray(np.einsum(attrs["equation"].replace(" ", ""), *inputs)).astype(inputs[0].dtype, copy=False)


SCATTER_REDUCTIONS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter(op: str, out: np.ndarray, index: Tuple[np.ndarray, ...], updates: np.ndarray,
             attrs: Dict[str, Any]) -> np.ndarray:
    """Write (reduction none: the last duplicate wins) or reduce ``updates`` into ``out`` at ``index``."""
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        out[index] = updates
    elif reduction in SCATTER_REDUCTIONS:
        SCATTER_REDUCTIONS[reduction].at(out, index, updates)  # .at: duplicates accumulate
    else:
        raise UnsupportedOpError(op, f"reduction={reduction!r}")
    return out


def scatter_elements(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, indices, updates = inputs[0], inputs[1].astype(np.int64), inputs[2]
    axis = axis_of(attrs.get("axis", 0), x.ndim, "ScatterElements")
    index = list(np.indices(indices.shape, sparse=True))
    index[axis] = np.where(indices < 0, indices + x.shape[axis], indices)
    return _scatter("ScatterElements", x.copy(), tuple(index), updates, attrs)


def scatter_nd(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x, indices, updates = inputs[0], inputs[1].astype(np.int64), inputs[2]
    return _scatter("ScatterND", x.copy(), tuple(np.moveaxis(indices, -1, 0)), updates, attrs)


def non_zero(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    return np.array(np.nonzero(inputs[0]), dtype=np.int64).reshape(inputs[0].ndim, -1)


def transpose(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    perm = attrs.get("perm")
    return np.transpose(inputs[0], None if perm is None else ints(perm))


def identity(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    return inputs[0]


OPS: Dict[str, Callable[[Inputs, Dict[str, Any]], Any]] = {
    "Identity": identity,
    "Reshape": reshape,
    "Flatten": flatten,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Transpose": transpose,
    "Shape": shape,
    "Size": lambda i, a: np.array(i[0].size, dtype=np.int64),
    "Concat": concat,
    "Gather": gather,
    "GatherElements": gather_elements,
    "Slice": slice_,
    "Split": split,
    "Expand": expand,
    "Tile": tile,
    "Pad": pad,
    "ConstantOfShape": constant_of_shape,
    "Constant": constant,
    "Range": range_,
    "Trilu": trilu,
    "DepthToSpace": depth_to_space,
    "SpaceToDepth": space_to_depth,
    "OneHot": one_hot,
    "TopK": top_k,
    "Einsum": einsum,
    "ScatterElements": scatter_elements,
    "ScatterND": scatter_nd,
    "NonZero": non_zero,
    "Cast": cast,
    "CastLike": cast_like,
}
OUTPUTS: Dict[str, int] = {"Split": 1 << 16, "TopK": 2}  # Split: as many as the node declares
CHECKS: Dict[str, Callable[[Dict[str, Any]], None]] = {"Pad": check_pad}
