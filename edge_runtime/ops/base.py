"""What every op function shares: the ``Attrs`` it is called with and small helpers for ONNX's
conventions (optional inputs, negative axes, tensor-valued attributes, the version-dependent place of
an operand: attribute in old opsets, input in new ones)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from edge_runtime.errors import UnsupportedOpError

Inputs = List[Optional[np.ndarray]]

# ONNX TensorProto.DataType → numpy. Types numpy cannot hold (string, bfloat16, float8, int4) are absent:
# an op asked for one refuses with UnsupportedOpError.
ONNX_DTYPES: Dict[int, Any] = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16,
                               6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64,
                               12: np.uint32, 13: np.uint64}
# The dtypes the executor computes with. Others that numpy can hold through add-on packages (ml_dtypes'
# bfloat16, float8, int4) look numeric but round and saturate differently: refused, never computed.
NATIVE_DTYPES = frozenset(np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                                np.uint16, np.uint32, np.uint64, np.float16, np.float32,
                                                np.float64))


def is_native(dtype: np.dtype) -> bool:
    return dtype in NATIVE_DTYPES
ONNX_TYPE_NAMES = {8: "string", 14: "complex64", 15: "complex128", 16: "bfloat16", 17: "float8e4m3fn",
                   18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
                   23: "float4e2m1", 24: "float8e8m0", 25: "uint2", 26: "int2"}
DEFAULT_OPSET = 17      # what compressor's export writes; a manifest without "opset" came from it


class Attrs(dict):
    """A node's attributes, plus what an op needs to know about the node itself: the model's opset
    (defaults changed across versions) and how many outputs the node declares."""

    def __init__(self, values: Dict[str, Any], op_type: str = "", opset: int = DEFAULT_OPSET,
                 outputs: int = 1, used: Sequence[bool] = (True,)) -> None:
        super().__init__(values)
        self.op_type = op_type
        self.opset = opset
        self.outputs = outputs
        self.used = tuple(used)


def output_used(attrs: Dict[str, Any], index: int) -> bool:
    """Whether anything reads output ``index``: an optional output nobody reads is not computed."""
    used = getattr(attrs, "used", (True,))
    return index < len(used) and used[index]


def opset_of(attrs: Dict[str, Any]) -> int:
    """The opset an op runs under (plain dicts, as direct callers pass, mean the default)."""
    return getattr(attrs, "opset", DEFAULT_OPSET)


def op_name(attrs: Dict[str, Any], fallback: str) -> str:
    return getattr(attrs, "op_type", "") or fallback


def optional(inputs: Inputs, index: int) -> Optional[np.ndarray]:
    """Input ``index`` or None when it is omitted (missing or given as the empty name)."""
    return inputs[index] if len(inputs) > index else None


def axis_of(axis: int, rank: int, op: str = "") -> int:
    """A non-negative axis; out of range is the model's error, said as the op's refusal."""
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise UnsupportedOpError(op or "?", f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def ints(values: Any) -> List[int]:
    """A 1-D int list from an attribute list or an int tensor."""
    return [int(v) for v in np.asarray(values).reshape(-1)]


def operand(inputs: Inputs, index: int, attrs: Dict[str, Any], name: str, since: int) -> Any:
    """An operand that moved from attribute ``name`` to input ``index`` in opset ``since``."""
    if opset_of(attrs) >= since:
        return optional(inputs, index)
    return attrs.get(name)


def attr_tensor(value: Any) -> np.ndarray:
    """A TENSOR attribute as numpy: manifest JSON writes ``{"tensor", "dtype", "shape"}``; an
    in-memory graph may hand the array itself."""
    if isinstance(value, dict) and "tensor" in value:
        return np.array(value["tensor"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    return np.asarray(value)


def numpy_dtype(code: int, op: str) -> Any:
    if code not in ONNX_DTYPES:
        name = ONNX_TYPE_NAMES.get(code, "unknown")
        raise UnsupportedOpError(op, f"data type {code} ({name}: no numpy equivalent in this runtime)")
    return ONNX_DTYPES[code]


def same_dtype(result: Any, like: np.ndarray) -> np.ndarray:
    """``result`` in ``like``'s dtype: numpy promotes (float32 * python float → float64 on 1.24 for
    0-d arrays); ONNX keeps the input's type."""
    return np.asarray(result).astype(like.dtype, copy=False)


def reduce_axes(inputs: Inputs, attrs: Dict[str, Any], since: int) -> Optional[Sequence[int]]:
    """The axes of a Reduce*/Squeeze-style op: attribute before ``since``, optional input after."""
    axes = operand(inputs, 1, attrs, "axes", since)
    return None if axes is None else ints(axes)
