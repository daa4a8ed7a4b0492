"""Conv on a whole batch at once: im2col columns times the weight kernel (for grouped and depthwise
convs too: see kernels.py). Used by weight layers (graph.WeightLayer) and by the Conv op whose weight
is computed at run time (ops.nn)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

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


def conv_op(inputs: List[Optional[np.ndarray]], attrs: Dict[str, Any]) -> np.ndarray:
    """Conv whose weight is an activation (no initializer): a dense kernel built for this call."""
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    groups = int(attrs.get("group", 1))
    kernel = conv_kernel("dense", weight.reshape(weight.shape[0], -1), None, groups, weight.shape, None, 1)
    return conv_forward(x, kernel, bias, attrs, weight.shape).astype(x.dtype, copy=False)
