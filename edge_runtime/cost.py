"""How much faster than onnxruntime the native program could be, from the model alone (no timing).

``auto`` times the native program against onnxruntime, and before that each weight layer's kernels:
on a convolutional network at 224×224 that is seconds (a mobilenet_v2: 2.9 s, a VGG19: 70 s) spent
finding that onnxruntime wins. This bound lets the tuner skip a native program that cannot win.

The model: onnxruntime costs one unit per dense multiply-accumulate of its weight layers (the other
ops cost both engines alike). The native program at its very best costs one unit per *non-zero*
weight use of a matrix-vector layer (a Gemm/MatMul, or a conv whose output is 1×1) — a CSR kernel
at perfect efficiency — and the full dense count for a conv with a larger output, where onnxruntime's
convolutions have always won (measured: never a native win on a conv with spatial output above 1×1,
even at 90% sparsity; see /work/shared/notes/measurements.md). The ratio is therefore an upper bound
on the native speed-up; real CSR kernels reach a quarter of it or less. Output sizes come from a walk
over the graph that knows the ops that change spatial sizes; where it cannot tell, a conv counts as
1×1 (the case most favourable to native), so an unknown never skips a candidate that might win.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from edge_runtime.graph import WEIGHT_OPS, is_weight_node

Spatial = Optional[Tuple[int, ...]]
# Below this bound the native program is not even built for timing. Native must beat onnxruntime by 5%
# (plan.NATIVE_MARGIN), and CSR kernels reached at most ~1/4 of their non-zero ratio in measurements
# (2048² and 4096² layers, 90-98%): 1.5 still times native on a device where they would do 2.5× better.
WORTH_TIMING = 1.5
WINDOW_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")
GLOBAL_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
# ops after which a tensor is no longer an image (or whose output size this walk does not follow)
SHAPE_OPS = ("Flatten", "Reshape", "Gemm", "MatMul", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Upsample",
             "Slice", "Gather", "ReduceMean", "ReduceMax", "ReduceSum", "Shape", "ConstantOfShape", "Expand",
             "Tile", "Pad", "SpaceToDepth", "DepthToSpace", "ConvTranspose", "Split", "Einsum")


def _window_output(size: Tuple[int, ...], attrs: Mapping[str, Any], kernel: Sequence[int],
                   ceil_mode: bool) -> Spatial:
    """Output spatial size of a conv/pool window over ``size`` (None when the attributes do not fit)."""
    rank = len(size)
    strides = list(attrs.get("strides") or [1] * rank)
    dilations = list(attrs.get("dilations") or [1] * rank)
    pads = list(attrs.get("pads") or [0] * (2 * rank))
    if len(kernel) != rank or len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        return None
    if attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(-(-n // max(int(s), 1)) for n, s in zip(size, strides))
    if attrs.get("auto_pad") == "VALID":
        pads = [0] * (2 * rank)
    out = []
    for axis, n in enumerate(size):
        span = n + int(pads[axis]) + int(pads[axis + rank]) - int(dilations[axis]) * (int(kernel[axis]) - 1) - 1
        step = max(int(strides[axis]), 1)
        out.append((-(-span // step) if ceil_mode else span // step) + 1)
    return tuple(out) if all(n >= 1 for n in out) else None


def output_sizes(manifest: Mapping[str, Any], weights: Any) -> Dict[str, Spatial]:
    """Each weight layer's output spatial size ``{weight name: (H, W) or () for a matrix layer}``;
    None where the walk cannot tell."""
    spatial: Dict[str, Spatial] = {}
    for spec in manifest.get("inputs") or [manifest["input"]]:
        dims = list(spec.get("shape") or [])[2:]
        spatial[spec["name"]] = tuple(dims) if dims and all(isinstance(d, int) for d in dims) else None
    sizes: Dict[str, Spatial] = {}
    for node in manifest["graph"]:
        op, attrs, inputs = node["op_type"], node.get("attributes") or {}, node["inputs"]
        known = next((spatial[name] for name in inputs if name and spatial.get(name) is not None), None)
        if op in WINDOW_OPS:
            source = spatial.get(inputs[0]) if inputs else None
            kernel = attrs.get("kernel_shape")
            if op == "Conv" and not kernel and len(inputs) > 1 and inputs[1] in weights.tensors:
                kernel = weights.info(inputs[1])["shape"][2:]
            out = _window_output(source, attrs, list(kernel or []), bool(attrs.get("ceil_mode", 0))) \
                if source is not None else None
        elif op in GLOBAL_OPS:
            out = (1,) * len(known) if known is not None else None
        elif op in SHAPE_OPS:
            out = None
        else:
            out = known
        for name in node["outputs"]:
            if name:
                spatial[name] = out
        if op in WEIGHT_OPS and is_weight_node(node, weights):
            sizes[inputs[1]] = out if op == "Conv" else ()
    return sizes


def native_gain_bound(manifest: Mapping[str, Any], weights: Any) -> float:
    """An upper bound on (onnxruntime time / native time) at batch 1, from MACs and non-zeros."""
    sizes = output_sizes(manifest, weights)
    dense_total = native_best = 0.0
    for name, size in sizes.items():
        shape = [int(d) for d in weights.info(name)["shape"]]
        positions = math.prod(size) if size else 1
        dense = math.prod(shape) * positions
        dense_total += dense
        native_best += dense if positions > 1 else weights.nonzeros(name) * positions
    if not sizes or native_best <= 0:
        return math.inf
    return dense_total / native_best

