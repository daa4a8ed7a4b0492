"""Resize (and the older Upsample): nearest and n-linear, applied one axis at a time (both are
separable, so this is exact). Cubic, antialiasing and tf_crop_and_resize are refused by name."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from edge_runtime.errors import UnsupportedOpError
from edge_runtime.ops.base import Inputs, axis_of, ints, opset_of, optional, same_dtype

TRANSFORMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric")
NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def check_resize(attrs: Dict[str, Any]) -> None:
    mode = attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise UnsupportedOpError("Resize", f"mode={mode!r}")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    if opset_of(attrs) >= 11 and transform not in TRANSFORMS:
        raise UnsupportedOpError("Resize", f"coordinate_transformation_mode={transform!r}")
    if attrs.get("nearest_mode", "round_prefer_floor") not in NEAREST:
        raise UnsupportedOpError("Resize", f"nearest_mode={attrs['nearest_mode']!r}")
    if attrs.get("antialias", 0):
        raise UnsupportedOpError("Resize", "antialias=1")


def _targets(x: np.ndarray, inputs: Inputs, attrs: Dict[str, Any]) -> Tuple[List[float], List[int]]:
    """Per-axis scale and output length, from scales or sizes (with ``axes`` and the aspect policy)."""
    if opset_of(attrs) < 11:  # Resize-10 / Upsample: scales only (attribute in Upsample-7)
        scales = [float(v) for v in np.asarray(optional(inputs, 1) if "scales" not in attrs
                                               else attrs["scales"]).reshape(-1)]
        return scales, [int(math.floor(n * s)) for n, s in zip(x.shape, scales)]
    axes = [axis_of(a, x.ndim, "Resize") for a in attrs.get("axes", range(x.ndim))]
    scales_in, sizes_in = optional(inputs, 2), optional(inputs, 3)
    scales, sizes = [1.0] * x.ndim, list(x.shape)
    if scales_in is not None and scales_in.size:
        for axis, s in zip(axes, np.asarray(scales_in, dtype=np.float64).reshape(-1)):
            scales[axis], sizes[axis] = float(s), int(math.floor(x.shape[axis] * float(s)))
        return scales, sizes
    wanted = ints(sizes_in)
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    ratios = [w / x.shape[a] for a, w in zip(axes, wanted)]
    if policy != "stretch":
        if policy not in ("not_larger", "not_smaller"):
            raise UnsupportedOpError("Resize", f"keep_aspect_ratio_policy={policy!r}")
        common = min(ratios) if policy == "not_larger" else max(ratios)
        ratios = [common] * len(axes)
        wanted = [int(round(common * x.shape[a])) for a in axes]  # half to even, as ONNX's reference
    for axis, ratio, size in zip(axes, ratios, wanted):
        scales[axis], sizes[axis] = ratio, size
    return scales, sizes


def _source(out: int, length: int, scale: float, transform: str) -> np.ndarray:
    """The input coordinate each output index samples."""
    i = np.arange(out, dtype=np.float64)
    if transform == "asymmetric":
        return i / scale
    if transform == "align_corners":  # ONNX: the resized length is scale × length, not the rounded size
        resized = scale * length
        return np.zeros(out) if resized == 1 else i * (length - 1) / (resized - 1)
    if transform == "pytorch_half_pixel" and out == 1:
        return np.zeros(out)
    if transform == "half_pixel_symmetric":
        adjustment = out / (scale * length)
        return length / 2 * (1 - adjustment) + (i + 0.5) / scale - 0.5
    return (i + 0.5) / scale - 0.5


def _nearest(coords: np.ndarray, mode: str, length: int) -> np.ndarray:
    rounding: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "floor": np.floor, "ceil": np.ceil,
        "round_prefer_floor": lambda c: np.where(c - np.floor(c) == 0.5, np.floor(c), np.round(c)),
        "round_prefer_ceil": lambda c: np.where(c - np.floor(c) == 0.5, np.ceil(c), np.round(c))}
    return np.clip(rounding[mode](coords), 0, length - 1).astype(np.int64)


def resize(inputs: Inputs, attrs: Dict[str, Any]) -> np.ndarray:
    x = inputs[0]
    check_resize(attrs)
    old = opset_of(attrs) < 11
    mode = "linear" if attrs.get("mode", "nearest") in ("linear", "bilinear") else "nearest"
    transform = "asymmetric" if old else attrs.get("coordinate_transformation_mode", "half_pixel")
    nearest = "floor" if old else attrs.get("nearest_mode", "round_prefer_floor")
    scales, sizes = _targets(x, inputs, attrs)
    y = x.astype(np.float64) if mode == "linear" else x
    for axis, (scale, size) in enumerate(zip(scales, sizes)):
        length = x.shape[axis]
        if size == length and scale == 1.0:
            continue
        coords = _source(size, length, scale, transform)
        if mode == "nearest":
            y = np.take(y, _nearest(coords, nearest, length), axis=axis)
            continue
        low = np.floor(coords)
        weight = (coords - low).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        first = np.clip(low, 0, length - 1).astype(np.int64)
        second = np.clip(low + 1, 0, length - 1).astype(np.int64)
        y = np.take(y, first, axis=axis) * (1 - weight) + np.take(y, second, axis=axis) * weight
    return same_dtype(y, x)


OPS: Dict[str, Callable[[Inputs, Dict[str, Any]], np.ndarray]] = {
    "Resize": resize,
    "Upsample": resize,
}
CHECKS: Dict[str, Callable[[Dict[str, Any]], None]] = {"Resize": check_resize, "Upsample": check_resize}
