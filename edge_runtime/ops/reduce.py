"""Reductions (Reduce*, ArgMax/ArgMin). Axes moved from attribute to input in opset 18 (13 for
ReduceSum); an empty axes list means all axes unless ``noop_with_empty_axes``."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from edge_runtime.ops.base import Inputs, axis_of, reduce_axes, same_dtype


def _axes(x: np.ndarray, inputs: Inputs, attrs: Dict[str, Any], since: int) -> Optional[Tuple[int, ...]]:
    axes = reduce_axes(inputs, attrs, since)
    if not axes:
        return () if attrs.get("noop_with_empty_axes", 0) else tuple(range(x.ndim))
    return tuple(sorted({axis_of(a, x.ndim) for a in axes}))


def _identity_value(x: np.ndarray, largest: bool) -> Any:
    """What max/min of an empty set is (ONNX: -inf/+inf, or the integer type's extreme)."""
    if x.dtype.kind == "f":
        return -np.inf if largest else np.inf
    info = np.iinfo(x.dtype) if x.dtype.kind in "iu" else None
    return (info.min if largest else info.max) if info else (not largest)


def _reducer(fn: Callable[..., np.ndarray], since: int = 18, pre: Callable = None, post: Callable = None,
             extreme: Optional[bool] = None) -> Callable[[Inputs, Dict[str, Any]], np.ndarray]:
    def run(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
        x = inputs[0]
        axes = _axes(x, inputs, attrs, since)
        if axes == ():
            return x
        keep = bool(attrs.get("keepdims", 1))
        data = pre(x) if pre else x
        kwargs = {"initial": _identity_value(x, extreme)} if extreme is not None else {}
        result = fn(data, axis=axes, keepdims=keep, **kwargs)
        return same_dtype(post(result) if post else result, x)
    return run


def _arg(fn: Callable[..., np.ndarray]) -> Callable[[Inputs, Dict[str, Any]], np.ndarray]:
    def run(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
        x = inputs[0]
        axis = axis_of(attrs.get("axis", 0), x.ndim, "ArgMax/ArgMin")
        if attrs.get("select_last_index", 0):  # first hit on the reversed axis, mapped back
            index = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis)
        else:
            index = fn(x, axis=axis)
        index = index.astype(np.int64)
        return np.expand_dims(index, axis) if attrs.get("keepdims", 1) else index
    return run


OPS: Dict[str, Callable[[Inputs, Dict[str, Any]], np.ndarray]] = {
    "ReduceMean": _reducer(np.mean),
    "ReduceSum": _reducer(np.sum, since=13),
    "ReduceMax": _reducer(np.max, extreme=True),
    "ReduceMin": _reducer(np.min, extreme=False),
    "ReduceProd": _reducer(np.prod),
    "ReduceSumSquare": _reducer(np.sum, pre=np.square),
    "ReduceL1": _reducer(np.sum, pre=np.abs),
    "ReduceL2": _reducer(np.sum, pre=np.square, post=np.sqrt),
    "ReduceLogSum": _reducer(np.sum, post=np.log),
    "ReduceLogSumExp": _reducer(np.sum, pre=np.exp, post=np.log),
    "ArgMax": _arg(np.argmax),
    "ArgMin": _arg(np.argmin),
}
