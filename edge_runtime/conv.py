"""Conv on a whole batch at once: im2col columns times the weight kernel (for grouped and depthwise
convs too: see kernels.py). Used by weight layers (graph.WeightLayer) and by the Conv op whose weight
is computed at run time (ops.nn)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_runtime.errors import UnsupportedOpError
from edge_runtime.kernels import GroupedDenseKernel, block_diagonal, make_kernel
from edge_runtime.windows import from_cols, im2col, resolve_pads


def conv_geometry(attrs: Dict[str, Any], weight_shape: Sequence[int]):
    """kernel shape, strides, dilations of a Conv node."""
    kernel = [int(k) for k in attrs.get("kernel_shape", weight_shape[2:])]
    rank = len(kernel)
    strides = [int(s) for s in attrs.get("strides", [1] * rank)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * rank)]
    return kernel, strides, dilations


def conv_kernel(kind: str, dense: Optional[np.ndarray], csr: Any, groups: int, weight_shape: Sequence[int],
                pool: Any, threads: int):
    """The kernel for a conv weight ``weight_shape`` viewed as ``[O, Cg*k]`` (give ``dense`` or ``csr``)."""
    if groups == 1:
        return make_kernel(kind, dense, csr, pool, threads)
    if kind == "dense":
        return GroupedDenseKernel(dense if dense is not None else csr.toarray(), groups)
    csr = csr if csr is not None else make_kernel("sparse", dense, None, None, 1).matrix
    return make_kernel(kind, None, block_diagonal(csr.tocsr(), groups), pool, threads)


def conv_forward(x: np.ndarray, kernel: Any, bias: Optional[np.ndarray], attrs: Dict[str, Any],
                 weight_shape: Sequence[int]) -> np.ndarray:
    """Conv of ``x`` ``[N, C, *spatial]`` with a weight of ``weight_shape`` held by ``kernel``."""
    kernel_shape, strides, dilations = conv_geometry(attrs, weight_shape)
    pads = resolve_pads("Conv", attrs, x.shape[2:], kernel_shape, strides, dilations)
    cols, out = im2col(x, kernel_shape, strides, pads, dilations)
    y = kernel.cols(cols)
    if bias is not None:
        y = y + bias.reshape(-1, 1)
    return from_cols(y, x.shape[0], out)


def check_groups(op: str, x: np.ndarray, weight: np.ndarray, groups: int) -> None:
    """The group checks load could not make for a weight computed in the graph: ``groups`` splits the
    weight's first axis, and the input's channels match the weight's (ValueError: the model is wrong)."""
    if x.ndim < 3 or weight.ndim != x.ndim:
        raise ValueError(f"{op}: input of shape {list(x.shape)} and weight of shape {list(weight.shape)}")
    first, per_group = weight.shape[0], weight.shape[1]
    channels = first if op == "ConvTranspose" else per_group * groups
    if groups < 1 or first % groups or x.shape[1] != channels:
        raise ValueError(f"{op}: group {groups} does not fit input of shape {list(x.shape)} and weight of "
                         f"shape {list(weight.shape)}")


def conv_op(inputs: List[Optional[np.ndarray]], attrs: Dict[str, Any]) -> np.ndarray:
    """Conv whose weight is an activation (no initializer): a dense kernel built for this call."""
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    groups = int(attrs.get("group", 1))
    check_groups("Conv", x, weight, groups)
    kernel = conv_kernel("dense", weight.reshape(weight.shape[0], -1), None, groups, weight.shape, None, 1)
    return conv_forward(x, kernel, bias, attrs, weight.shape).astype(x.dtype, copy=False)


def _transpose_pads(attrs: Dict[str, Any], spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                    dilations: Sequence[int]) -> Tuple[List[int], List[int]]:
    """ConvTranspose's pads ``[begins..., ends...]`` and output padding: explicit, or what
    ``output_shape``/``auto_pad`` imply (the odd cell goes at the end for SAME_UPPER, at the start
    for SAME_LOWER; an output larger than the full result is zero-extended at the end)."""
    rank = len(kernel)
    extra = [int(v) for v in attrs.get("output_padding", [0] * rank)]
    full = [s * (n - 1) + e + (k - 1) * d + 1 for n, k, s, d, e in zip(spatial, kernel, strides, dilations, extra)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" in attrs:
        target = [int(v) for v in attrs["output_shape"]][-rank:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = [n * s for n, s in zip(spatial, strides)]
    elif auto_pad in ("NOTSET", "", "VALID"):
        pads = [int(v) for v in attrs.get("pads", [0] * (2 * rank))] if auto_pad != "VALID" else [0] * (2 * rank)
        return pads, extra
    else:
        raise UnsupportedOpError("ConvTranspose", f"auto_pad={auto_pad}")
    extra = [e + max(t - f, 0) for e, t, f in zip(extra, target, full)]
    total = [max(f - t, 0) for f, t in zip(full, target)]
    if auto_pad == "SAME_LOWER":
        return [t - t // 2 for t in total] + [t // 2 for t in total], extra
    return [t // 2 for t in total] + [t - t // 2 for t in total], extra


def conv_transpose_op(inputs: List[Optional[np.ndarray]], attrs: Dict[str, Any]) -> np.ndarray:
    """ConvTranspose: each input pixel scatters ``W`` into the output. One matmul gives every
    (output channel, tap, pixel) product; one strided add per kernel tap places them (no loop over
    pixels or groups); pads then crop the result."""
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    groups = int(attrs.get("group", 1))
    check_groups("ConvTranspose", x, weight, groups)
    batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    rank = len(spatial)
    kernel, strides, dilations = conv_geometry(attrs, weight.shape)
    pads, extra = _transpose_pads(attrs, spatial, kernel, strides, dilations)
    per_group_out = weight.shape[1]
    taps = int(np.prod(kernel))
    # [G, Mg*taps, Cg] @ [G, Cg, N*P] → [G, Mg, taps, N, *spatial]
    w = weight.reshape(groups, channels // groups, per_group_out * taps).transpose(0, 2, 1)
    cols = x.reshape(batch, groups, channels // groups, -1).transpose(1, 2, 0, 3).reshape(groups, channels // groups, -1)
    products = np.matmul(w, cols).reshape(groups * per_group_out, taps, batch, *spatial)
    full = [s * (n - 1) + e + (k - 1) * d + 1 for n, k, s, d, e in zip(spatial, kernel, strides, dilations, extra)]
    out = np.zeros((groups * per_group_out, batch, *full), dtype=np.result_type(x.dtype, weight.dtype))
    for t, tap in enumerate(np.ndindex(*kernel)):
        where = tuple(slice(k * d, k * d + s * (n - 1) + 1, s) for k, d, s, n in zip(tap, dilations, strides, spatial))
        out[(slice(None), slice(None), *where)] += products[:, t]
    crop = tuple(slice(b, f - e) for b, e, f in zip(pads[:rank], pads[rank:], full))
    y = np.moveaxis(out[(slice(None), slice(None), *crop)], 1, 0)
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * rank))
    return np.ascontiguousarray(y).astype(x.dtype, copy=False)
