"""Sliding windows over the spatial axes of NCHW-style arrays: the shared core of im2col and pooling.

Padding, strides, dilations and ``auto_pad``/``ceil_mode`` follow the ONNX operator definitions, so
Conv, MaxPool and AveragePool agree with onnxruntime on every output size.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_runtime.errors import UnsupportedOpError


def resolve_pads(op: str, attrs: Dict[str, Any], spatial: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> List[int]:
    """ONNX pads ``[b1, b2, ..., e1, e2, ...]`` after applying ``auto_pad``."""
    rank = len(spatial)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * rank)))
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedOpError(op, f"auto_pad={auto_pad}")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _pad(x: np.ndarray, begin: Sequence[int], end: Sequence[int], value: float) -> np.ndarray:
    """Constant padding of the trailing ``len(begin)`` axes (np.pad does the same, several times slower)."""
    rank = len(begin)
    lead = x.shape[:x.ndim - rank]
    shape = lead + tuple(n + b + e for n, b, e in zip(x.shape[-rank:], begin, end))
    out = np.full(shape, value, dtype=x.dtype)
    out[(Ellipsis, *(slice(b, b + n) for b, n in zip(begin, x.shape[-rank:])))] = x
    return out


def windows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
            dilations: Sequence[int], ceil_mode: bool = False, pad_value: float = 0.0,
            extra_value: Optional[float] = None) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """A view ``[*lead, *out_spatial, *kernel]`` of ``x`` (``[*lead, *spatial]``), and the output size.

    ``ceil_mode`` may need extra padding at the end, beyond the explicit pads; it is filled with
    ``extra_value`` (default ``pad_value``), so an average can count explicit pads but not those cells.
    """
    rank = len(kernel)
    spatial = x.shape[-rank:]
    begin, end = list(pads[:rank]), list(pads[rank:])
    extra = [0] * rank
    out = []
    for i in range(rank):
        span = (kernel[i] - 1) * dilations[i] + 1
        padded = spatial[i] + begin[i] + end[i]
        size = (padded - span) / strides[i] + 1
        n = math.ceil(size) if ceil_mode else math.floor(size)
        if ceil_mode and (n - 1) * strides[i] >= spatial[i] + begin[i]:
            n -= 1  # ONNX: the last window must start inside the input or its leading pad
        out.append(int(n))
        extra[i] = max((n - 1) * strides[i] + span - padded, 0)
    if any(begin) or any(end):
        x = _pad(x, begin, end, pad_value)
    if any(extra):
        x = _pad(x, [0] * rank, extra, pad_value if extra_value is None else extra_value)
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    axes = tuple(range(x.ndim - rank, x.ndim))
    view = sliding_window_view(x, spans, axis=axes)
    lead = (slice(None),) * (x.ndim - rank)
    view = view[lead + tuple(slice(0, n * s, s) for n, s in zip(out, strides))
                + tuple(slice(None, None, d) for d in dilations)]
    return view, tuple(out)


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
           dilations: Sequence[int]) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """Columns ``[C*prod(kernel), N*prod(out)]`` of a batch ``[N, C, *spatial]``, row order (c, k...)
    matching a weight ``[out, C, *kernel]`` viewed as ``[out, C*prod(kernel)]``, column order (n, out...).
    One copy for the whole batch; none at all for a 1×1 conv at batch 1."""
    rank = len(kernel)
    batch, channels = x.shape[0], x.shape[1]
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads):
        cols = x.reshape(batch, channels, -1)
        cols = cols[0] if batch == 1 else cols.transpose(1, 0, 2).reshape(channels, -1)
        return cols, tuple(x.shape[2:])
    view, out = windows(x, kernel, strides, pads, dilations)       # [N, C, *out, *kernel]
    order = (1, *range(2 + rank, 2 + 2 * rank), 0, *range(2, 2 + rank))  # [C, *kernel, N, *out]
    cols = view.transpose(order).reshape(channels * int(np.prod(kernel)), -1)
    return cols, out


def from_cols(y: np.ndarray, batch: int, out: Sequence[int]) -> np.ndarray:
    """``[O, N*prod(out)]`` back to ``[N, O, *out]``."""
    y = y.reshape(y.shape[0], batch, *out)
    return y[None, :, 0] if batch == 1 else np.ascontiguousarray(np.moveaxis(y, 1, 0))
