"""Latency tables, the device side: the file format, and timing one Conv/Linear layer in onnxruntime.

MACs predict onnxruntime latency poorly (channel counts that fill the CPU's vector blocks run far
faster than fewer MACs that do not), so ``--allocate latency`` plans widths from measured times. A table
maps a layer *shape* (op, input and output widths, kernel, stride, padding, groups, input size) to the
p50 milliseconds of that layer alone, run at batch 1 in onnxruntime on the machine that measured it.

Measuring needs numpy and onnxruntime only (the one-layer ONNX models are written here by hand), which
is what a device's edge-runtime venv has, so the deployed runtime measures where the model will run::

    python3 -m compressor.latency_shapes --model resnet20 --shapes-out shapes.json      # workstation (torch)
    ~/.edgeprune/venv/bin/python -m edge_runtime.layer_timing --shapes shapes.json --out table.json

Planning widths from a table is the workstation's job (``compressor.prune.latency``). A table and a
shapes file are untrusted input: every field is checked, and any fault is one ``LatencyTableError`` line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from edge_runtime.errors import EdgeRuntimeError, ModelDirError
from edge_runtime.safe_io import atomic_write_text, read_bounded

FORMAT = "edgeprune-latency-table"
VERSION = 1
MAX_BYTES = 16 * 1024 * 1024  # a table is a few hundred entries; refuse to parse a huge file
MAX_ENTRIES = 100_000


class LatencyTableError(EdgeRuntimeError):
    """A latency table that cannot be read, is malformed, or lacks shapes the run needs."""


@dataclass(frozen=True)
class LayerShape:
    """One Conv (any dimension) or Linear layer at batch 1. ``spatial`` is the input's size after
    the channel axis (Conv: H, W; Linear: the leading token dims, usually empty)."""

    op: str  # "conv" or "linear"
    cin: int
    cout: int
    spatial: Tuple[int, ...] = ()
    kernel: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] = ()
    dilation: Tuple[int, ...] = ()
    groups: int = 1

    def key(self) -> str:
        """The table's key: one canonical line per shape."""
        if self.op == "linear":
            return f"linear {self.cin}->{self.cout} @{_dims(self.spatial)}"
        return (f"conv k{_dims(self.kernel)} s{_dims(self.stride)} p{_dims(self.padding)} "
                f"d{_dims(self.dilation)} g{self.groups} {self.cin}->{self.cout} @{_dims(self.spatial)}")

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "LayerShape":
        """A shape from a shapes file, checked (the file may come from anywhere)."""
        if not isinstance(data, dict) or data.get("op") not in ("conv", "linear"):
            raise LatencyTableError(f"{source}: a shape is not an object with op conv or linear")
        try:
            shape = cls(op=data["op"], cin=_small_int(data["cin"]), cout=_small_int(data["cout"]),
                        spatial=_ints(data.get("spatial", ())), kernel=_ints(data.get("kernel", ())),
                        stride=_ints(data.get("stride", ())), padding=_ints(data.get("padding", ()), 0),
                        dilation=_ints(data.get("dilation", ())), groups=_small_int(data.get("groups", 1)))
        except (KeyError, TypeError, ValueError) as error:
            raise LatencyTableError(f"{source}: shape {str(data)[:120]} is malformed ({error})") from None
        if shape.op == "conv" and not (len(shape.kernel) == len(shape.stride) == len(shape.dilation)
                                       == len(shape.spatial) and len(shape.padding) == 2 * len(shape.kernel)
                                       and 1 <= len(shape.kernel) <= 3
                                       and shape.cin % shape.groups == 0 and shape.cout % shape.groups == 0):
            raise LatencyTableError(f"{source}: conv shape {shape.key()} is inconsistent")
        return shape


def _dims(values: Sequence[int]) -> str:
    return "x".join(map(str, values)) or "-"


def _small_int(value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1_000_000:
        raise ValueError(f"{value!r} is not an integer in [{low}, 1e6]")
    return value


def _ints(values: Any, low: int = 1) -> Tuple[int, ...]:
    if not isinstance(values, (list, tuple)) or len(values) > 6:
        raise ValueError(f"{values!r} is not a short list of integers")
    return tuple(_small_int(v, low) for v in values)


ENGINES = ("ort", "ort-int8")  # onnxruntime fp32; onnxruntime static QDQ int8 (what export --quantize int8 ships)


@dataclass
class LatencyTable:
    """Milliseconds per layer shape (by :meth:`LayerShape.key`), and how they were measured.

    ``ms`` excludes ``call_ms``, the fixed cost of one ``session.run()``; ``node_ms`` is what each
    further node inside one session costs (a network of N layers and M other nodes is predicted at
    ``call_ms + sum(ms) + node_ms * M``). ``device`` is :func:`device_fingerprint` of the measuring machine.
    """

    ms: Dict[str, float]
    threads: int = 1
    measured_on: str = ""
    engine: str = "ort"
    call_ms: float = 0.0
    node_ms: float = 0.0
    device: str = ""

    def missing(self, shapes: Iterable[LayerShape]) -> List[str]:
        """Keys of ``shapes`` the table has no time for (sorted, unique)."""
        return sorted({s.key() for s in shapes} - set(self.ms))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "threads": self.threads,
                           "measured_on": self.measured_on, "engine": self.engine, "call_ms": self.call_ms,
                           "node_ms": self.node_ms, "device": self.device,
                           "ms": dict(sorted(self.ms.items()))}, indent=1) + "\n"


def read_table(path: Path, what: str = "--latency-table") -> LatencyTable:
    """A table from ``path``, every field validated; any fault is one ``LatencyTableError`` line."""
    return parse_table(_read_json(path, what), f"{what} {path}")


def parse_table(data: Any, where: str) -> LatencyTable:
    """A table from parsed JSON (a file, or a device's answer), every field validated."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LatencyTableError(f"{where}: not an edgeprune latency table (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise LatencyTableError(f"{where}: version {repr(data.get('version'))[:20]} is not {VERSION}")
    threads, entries = data.get("threads", 1), data.get("ms")
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise LatencyTableError(f"{where}: \"threads\" must be an integer in [1, 1024]")
    if not isinstance(entries, dict) or not entries or len(entries) > MAX_ENTRIES:
        raise LatencyTableError(f"{where}: \"ms\" must map 1 to {MAX_ENTRIES} layer shapes to milliseconds")
    for key, value in entries.items():
        if len(key) > 200 or not _positive_ms(value):
            raise LatencyTableError(f"{where}: entry {key[:80]!r} must be a positive finite number of "
                                    f"milliseconds, got {str(value)[:40]}")
    engine = data.get("engine", "ort")
    if engine not in ENGINES:
        raise LatencyTableError(f"{where}: \"engine\" {str(engine)[:40]!r} is not one of {', '.join(ENGINES)}")
    fixed = {name: data.get(name, 0.0) for name in ("call_ms", "node_ms")}
    for name, value in fixed.items():
        if value != 0 and not _positive_ms(value):
            raise LatencyTableError(f"{where}: \"{name}\" must be a finite number of milliseconds >= 0, "
                                    f"got {str(value)[:40]}")
    return LatencyTable({k: float(v) for k, v in entries.items()}, threads, _text(data.get("measured_on")),
                        engine, float(fixed["call_ms"]), float(fixed["node_ms"]), _text(data.get("device")))


def _positive_ms(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and 0 < value < 1e6


def _text(value: Any) -> str:
    """A free-text field of a table: a short string, or empty (never fails: it is only shown)."""
    return value[:500] if isinstance(value, str) else ""


def read_shapes(path: Path) -> List[LayerShape]:
    """The shapes file ``--shapes-out`` wrote (``{"shapes": [...]}``), validated."""
    data = _read_json(path, "--shapes")
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) or \
            not 0 < len(data["shapes"]) <= MAX_ENTRIES:
        raise LatencyTableError(f"--shapes {path}: expected {{\"shapes\": [...]}} with 1 to {MAX_ENTRIES} shapes")
    return [LayerShape.from_dict(item, f"--shapes {path}") for item in data["shapes"]]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_bounded(path, MAX_BYTES).decode("utf-8"))
    except ModelDirError as error:  # not a regular file, missing, or over MAX_BYTES
        if "larger than" in str(error):
            raise LatencyTableError(f"{what} {path}: too large for a latency table (over {MAX_BYTES} bytes)") from None
        raise LatencyTableError(f"{what} {path}: cannot read it ({str(error).replace(str(path), '').strip(' :')})") from None
    except OSError as error:
        raise LatencyTableError(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise LatencyTableError(f"{what} {path}: not valid JSON ({str(error)[:100]})") from None


# --- is a table fit to plan with? ---------------------------------------------------------------------
# A table comes from a device, a cache or a user's file. Finite and positive is checked on reading; what
# planning needs besides is that it covers the run's shapes and that its times follow width at least
# roughly: a flat table (every shape the same) makes every width look free to remove, an inverted one
# (wider is faster) makes pruning look like a slow-down. Those are refused; milder doubts are warnings.

FLAT_RATIO = 1.01       # max/min time over all needed shapes at or below this, with MACs varying: flat
INVERTED_RATIO = 1.10   # a family's narrowest shape this much slower than its widest: that family is inverted
INVERTED_ABS_MS = 0.002  # ... and by at least this much (tiny layers time at noise level)
MIN_SPREAD = 2.0        # families whose MACs vary less than this are not judged


def macs(shape: LayerShape) -> int:
    """Multiply-accumulates of ``shape`` at batch 1 (a Conv's output size from its padding and stride)."""
    if shape.op == "linear":
        return shape.cin * shape.cout * math.prod(shape.spatial)
    dims = len(shape.kernel)
    out = [max(1, (size + shape.padding[i] + shape.padding[i + dims] - shape.dilation[i] * (shape.kernel[i] - 1) - 1)
               // shape.stride[i] + 1) for i, size in enumerate(shape.spatial)]
    return shape.cout * (shape.cin // shape.groups) * math.prod(shape.kernel) * math.prod(out)


def _family(shape: LayerShape) -> Tuple[Any, ...]:
    """What a shape is besides its widths: shapes of one family differ only in channel counts."""
    depthwise = shape.groups > 1 and shape.groups == shape.cin == shape.cout
    return (shape.op, shape.spatial, shape.kernel, shape.stride, shape.padding, shape.dilation,
            "dw" if depthwise else shape.groups)


def check_for_planning(table: LatencyTable, shapes: Sequence[LayerShape], source: str) -> List[str]:
    """Refuse (``LatencyTableError``, one line) a table that lacks shapes or whose times do not follow
    width at all (flat, or inverted in most layer families); return one-line warnings for milder doubts."""
    needed = list({s.key(): s for s in shapes}.values())
    missing = table.missing(needed)
    if missing:
        raise LatencyTableError(f"{source} lacks {len(missing)} of the {len(needed)} layer shape(s) this run needs "
                                f"(e.g. {missing[0]!r}); measure it for this model (--latency-on)")
    times = [table.ms[s.key()] for s in needed]
    work = [macs(s) for s in needed]
    if len(needed) > 1 and max(work) >= MIN_SPREAD * min(work) and max(times) <= FLAT_RATIO * min(times):
        raise LatencyTableError(f"{source} is flat: all {len(needed)} layer shapes take {min(times):.4g} ms whatever "
                                f"their width, so it cannot tell which channels are worth removing; measure it again")
    judged, inverted = _inverted_families(table, needed)
    if judged and len(inverted) * 2 > judged:
        raise LatencyTableError(f"{source} is inverted: wider layers are faster in {len(inverted)} of {judged} layer "
                                f"families (e.g. {inverted[0]}), so pruning would predict a slow-down; measure it again")
    warnings = []
    if inverted:
        warnings.append(f"{source}: wider layers are faster in {len(inverted)} of {judged} layer families "
                        f"(e.g. {inverted[0]}); plans there follow the table, not the MACs")
    floored = sum(1 for t in times if t <= 2 * FLOOR_MS)
    if floored * 4 > len(times):
        warnings.append(f"{source}: {floored} of {len(times)} layer shapes time at or below the per-call overhead "
                        f"(too small to tell apart on this device); their widths are planned as free")
    return warnings


def _inverted_families(table: LatencyTable, needed: Sequence[LayerShape]) -> Tuple[int, List[str]]:
    """How many families have widths spread enough to judge (3 or more MAC counts, the widest at least
    MIN_SPREAD times the narrowest), and the ones whose times fall as MACs rise (rank correlation
    below -0.5, and the narrowest clearly slower than the widest), as ``narrow (ms) > wide (ms)``.
    One slow narrow width is a kernel's quirk the table is there to find, not an inversion."""
    families: Dict[Tuple[Any, ...], List[LayerShape]] = {}
    for shape in needed:
        families.setdefault(_family(shape), []).append(shape)
    judged, inverted = 0, []
    for members in families.values():
        work = [macs(s) for s in members]
        if len(set(work)) < 3 or max(work) < MIN_SPREAD * min(work):
            continue
        judged += 1
        times = [table.ms[s.key()] for s in members]
        narrow, wide = members[work.index(min(work))], members[work.index(max(work))]
        slow, fast = table.ms[narrow.key()], table.ms[wide.key()]
        if _rank_correlation(work, times) < -0.5 and slow > INVERTED_RATIO * fast and slow - fast > INVERTED_ABS_MS:
            inverted.append(f"{narrow.key()!r} {slow:.4g} ms > {wide.key()!r} {fast:.4g} ms")
    return judged, inverted


def _rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); 0 when either side is constant."""
    def ranks(values: Sequence[float]) -> List[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                out[order[position]] = (start + end) / 2
            start = end + 1
        return out
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    covariance = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    spread = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return covariance / spread if spread else 0.0


# --- measuring (numpy, onnxruntime) -------------------------------------------------------------------
# A one-layer ONNX model is a few protobuf fields: written here by hand, so that measuring needs no
# `onnx` package — a Raspberry Pi's edge-runtime venv has numpy and onnxruntime only.

_FLOAT, _UINT8, _INT8, _INT32 = 1, 2, 3, 6  # TensorProto.DataType
_NUMPY_TYPES = {_FLOAT: "<f4", _UINT8: "u1", _INT8: "i1", _INT32: "<i4"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value: Any) -> bytes:
    """One protobuf field: an int is a varint, bytes/str are length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: Any, data_type: int = _FLOAT) -> bytes:
    """TensorProto: dims, data_type, name, raw_data (little-endian)."""
    return (b"".join(_field(1, int(d)) for d in array.shape) + _field(2, data_type) + _field(8, name)
            + _field(9, array.astype(_NUMPY_TYPES[data_type]).tobytes()))


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], **ints: Any) -> bytes:
    """NodeProto with INT / INTS attributes (AttributeProto type 2 / 7)."""
    attributes = [_field(1, key) + (_field(3, value) + _field(20, 2) if isinstance(value, int)
                                    else b"".join(_field(8, v) for v in value) + _field(20, 7))
                  for key, value in ints.items()]
    return (b"".join(_field(1, i) for i in inputs) + b"".join(_field(2, o) for o in outputs) + _field(4, op)
            + b"".join(_field(5, a) for a in attributes))


def _value_info(name: str, dims: Optional[Sequence[int]]) -> bytes:
    """ValueInfoProto: a float tensor, with a fixed shape or none."""
    shape = b"" if dims is None else _field(2, b"".join(_field(1, _field(1, int(d))) for d in dims))
    return _field(1, name) + _field(2, _field(1, _field(1, 1) + shape))


def _model(nodes: Sequence[bytes], initializers: Sequence[bytes], x_shape: Sequence[int]) -> bytes:
    """ModelProto of one graph from input X (float, ``x_shape``) to output Y."""
    graph = (b"".join(_field(1, node) for node in nodes) + _field(2, "layer")
             + b"".join(_field(5, w) for w in initializers) + _field(11, _value_info("X", x_shape))
             + _field(12, _value_info("Y", None)))
    # ir_version 8 and opset 17: readable by every onnxruntime a Pi may have (>= 1.10)
    return _field(1, 8) + _field(8, _field(1, "") + _field(2, 17)) + _field(7, graph)


def input_dims(shape: LayerShape) -> List[int]:
    """The layer's input at batch 1."""
    return [1, *shape.spatial, shape.cin] if shape.op == "linear" else [1, shape.cin, *shape.spatial]


def _conv_attributes(shape: LayerShape) -> Dict[str, Any]:
    return dict(kernel_shape=list(shape.kernel), strides=list(shape.stride), pads=list(shape.padding),
                dilations=list(shape.dilation), group=shape.groups)


def layer_onnx(shape: LayerShape, engine: str = "ort") -> bytes:
    """A one-layer ONNX model of ``shape`` with random weights: Conv, or MatMul+Add for Linear; with
    ``engine="ort-int8"`` the static QDQ form ``export --quantize int8`` ships (see :func:`_int8_layer`)."""
    import numpy as np

    if engine == "ort-int8":
        return _int8_layer(shape)
    rng = np.random.default_rng(0)
    if shape.op == "linear":
        weights = [_tensor("W", rng.standard_normal((shape.cin, shape.cout))), _tensor("B", rng.standard_normal(shape.cout))]
        nodes = [_node("MatMul", ["X", "W"], ["XW"]), _node("Add", ["XW", "B"], ["Y"])]
    else:
        w_shape = (shape.cout, shape.cin // shape.groups, *shape.kernel)
        weights = [_tensor("W", rng.standard_normal(w_shape)), _tensor("B", rng.standard_normal(shape.cout))]
        nodes = [_node("Conv", ["X", "W", "B"], ["Y"], **_conv_attributes(shape))]
    return _model(nodes, weights, input_dims(shape))


def _int8_layer(shape: LayerShape) -> bytes:
    """The layer as onnxruntime's ``quantize_static`` writes it (QDQ, uint8 activations, per-channel
    symmetric int8 weights, int32 bias): input and output pass QuantizeLinear/DequantizeLinear, so
    onnxruntime fuses DQ→Conv→Q into QLinearConv (Linear: Gemm into QGemm, MatMul into QLinearMatMul)."""
    import numpy as np

    rng = np.random.default_rng(0)
    fan_in = shape.cin // shape.groups * math.prod(shape.kernel) if shape.op == "conv" else shape.cin
    x_scale, y_scale = 8.0 / 255, 8.0 * math.sqrt(fan_in) * 0.05 / 255  # N(0,1) inputs, weights ~ 0.05
    as_gemm = shape.op == "linear" and not shape.spatial
    if shape.op == "conv":
        w = rng.standard_normal((shape.cout, shape.cin // shape.groups, *shape.kernel)) * 0.05
    else:
        w = rng.standard_normal((shape.cout, shape.cin) if as_gemm else (shape.cin, shape.cout)) * 0.05
    channel_axis = 1 if shape.op == "linear" and not as_gemm else 0
    w_scale = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a != channel_axis)) / 127
    w_q = np.round(w / np.expand_dims(w_scale, tuple(a for a in range(w.ndim) if a != channel_axis)))
    b_scale = x_scale * w_scale
    initializers = [
        _tensor("x_scale", np.array(x_scale)), _tensor("x_zero", np.array(128), _UINT8),
        _tensor("y_scale", np.array(y_scale)), _tensor("y_zero", np.array(128), _UINT8),
        _tensor("W_q", w_q, _INT8), _tensor("w_scale", w_scale), _tensor("w_zero", np.zeros(w_scale.shape), _INT8),
        _tensor("B_q", np.round(rng.standard_normal(shape.cout) * 0.1 / b_scale), _INT32),
        _tensor("b_scale", b_scale), _tensor("b_zero", np.zeros(shape.cout), _INT32)]
    nodes = [_node("QuantizeLinear", ["X", "x_scale", "x_zero"], ["X_q"]),
             _node("DequantizeLinear", ["X_q", "x_scale", "x_zero"], ["X_dq"]),
             _node("DequantizeLinear", ["W_q", "w_scale", "w_zero"], ["W_dq"], axis=channel_axis)]
    if shape.op == "conv" or as_gemm:
        nodes.append(_node("DequantizeLinear", ["B_q", "b_scale", "b_zero"], ["B_dq"], axis=0))
    if shape.op == "conv":
        nodes.append(_node("Conv", ["X_dq", "W_dq", "B_dq"], ["Y_f"], **_conv_attributes(shape)))
    elif as_gemm:
        nodes.append(_node("Gemm", ["X_dq", "W_dq", "B_dq"], ["Y_f"], transB=1))
    else:  # quantize_static quantizes the Add too (its bias as a uint8 input): QLinearMatMul + QLinearAdd
        initializers += [_tensor("B_u8", np.full(shape.cout, 140), _UINT8)]
        nodes += [_node("MatMul", ["X_dq", "W_dq"], ["XW"]),
                  _node("QuantizeLinear", ["XW", "y_scale", "y_zero"], ["XW_q"]),
                  _node("DequantizeLinear", ["XW_q", "y_scale", "y_zero"], ["XW_dq"]),
                  _node("DequantizeLinear", ["B_u8", "x_scale", "x_zero"], ["B_add"]),
                  _node("Add", ["XW_dq", "B_add"], ["Y_f"])]
    nodes += [_node("QuantizeLinear", ["Y_f", "y_scale", "y_zero"], ["Y_q"]),
              _node("DequantizeLinear", ["Y_q", "y_scale", "y_zero"], ["Y"])]
    return _model(nodes, initializers, input_dims(shape))


def _chain_onnx(nodes: int) -> bytes:
    """``nodes`` cheap elementwise nodes in a row on 8 floats: each one costs what any node inside a
    session costs besides its work (alternating Relu and Neg, which no optimizer merges)."""
    names = ["X", *(f"t{i}" for i in range(1, nodes)), "Y"]
    chain = [_node("Relu" if i % 2 == 0 else "Neg", [names[i]], [names[i + 1]]) for i in range(nodes)]
    return _model(chain, [], [1, 8])


# The smallest layer there is: its time is onnxruntime's fixed cost of one run() call (call_ms), which
# a layer inside a whole network does not pay. Subtracted from every entry so that ratios of predicted
# latencies (--target-speedup) are ratios of compute; differences (what the allocation uses) are unchanged.
OVERHEAD_SHAPE = LayerShape("conv", 1, 1, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)
OVERHEAD_LINEAR = LayerShape("linear", 1, 1)  # cheaper than the conv in some engines (int8): the smaller counts
FLOOR_MS = 1e-4  # entries stay positive: a layer never costs nothing
CHAIN = 33       # node_ms is the slope between a chain of 1 cheap node and a chain of CHAIN


def max_threads() -> int:
    """The most intra-op threads a measurement may ask for (more only hangs or crashes onnxruntime)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= max_threads():
        raise LatencyTableError(f"--threads must be an integer in [1, {max_threads()}] on this machine, got {threads}")
    return threads


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _random_feed(session: Any) -> Dict[str, Any]:
    """Random inputs of the session's declared shapes (a named or unknown dim is 1); integer and
    boolean inputs are zeros (a random index may be out of range)."""
    import numpy as np

    rng, feed = np.random.default_rng(1), {}
    for item in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in (item.shape or [])]
        kind = item.type[len("tensor("):-1] if item.type.startswith("tensor(") else "float"
        dtype = {"float": np.float32, "double": np.float64, "float16": np.float16}.get(kind)
        if dtype is not None:
            feed[item.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feed[item.name] = np.zeros(dims, dtype=np.bool_ if kind == "bool" else np.dtype(kind))
    return feed


def _min_medians(sessions: Sequence[Any], rounds: int, runs: int) -> List[float]:
    """Milliseconds per session: rounds interleaved over all of them (load on a shared machine hits
    them alike), the smallest of each one's per-round medians, the least disturbed estimate."""
    feeds = [_random_feed(session) for session in sessions]
    medians: List[List[float]] = [[] for _ in sessions]
    for round_ in range(rounds + 1):
        for index, session in enumerate(sessions):
            times = []
            for _ in range(runs if round_ else 2):  # round 0 warms caches and allocators
                began = time.perf_counter()
                session.run(None, feeds[index])
                times.append(time.perf_counter() - began)
            if round_:
                medians[index].append(statistics.median(times))
    return [1000.0 * min(m) for m in medians]


def measure(shapes: Sequence[LayerShape], threads: int = 1, rounds: int = 5, runs: int = 20,
            engine: str = "ort") -> LatencyTable:
    """Time every distinct shape at batch 1 with ``threads`` intra-op threads in ``engine``.

    A shape's figure is its one-layer model's time less ``call_ms`` (``OVERHEAD_SHAPE``'s time);
    ``node_ms`` is the per-node slope of chains of cheap nodes, timed in the same rounds. (A shape
    among ``shapes`` equal to an overhead shape is timed twice; harmless.)
    """
    if engine not in ENGINES:
        raise LatencyTableError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    check_threads(threads)
    unique = [OVERHEAD_SHAPE, OVERHEAD_LINEAR, *{s.key(): s for s in shapes}.values()]
    models = [_chain_onnx(1), _chain_onnx(CHAIN), *(layer_onnx(shape, engine) for shape in unique)]
    times = _min_medians([_session(model, threads) for model in models], rounds, runs)
    node_ms = max(0.0, (times[1] - times[0]) / (CHAIN - 1))
    call_ms = min(times[2:4])
    ms = {shape.key(): max(FLOOR_MS, t - call_ms) for shape, t in zip(unique[2:], times[4:])}
    return LatencyTable(ms, threads, measured_on(), engine, call_ms, node_ms, device_fingerprint())


# Whole networks are compared by a low quantile of their run times, not the median: on a machine shared
# with other work, a run that does not fit in one scheduler slice is preempted, so the median of a network
# just over a slice reads several times slower than one just under (resnet20 vs a pruned one, 5 sessions on
# 2 busy cores: dense/pruned p50 ratios 1.88-3.50, p25 ratios 1.96-2.02). On an idle device the two differ
# by a few percent, and the quantile is still what a user sees there: the typical run.
NETWORK_QUANTILE = 0.25
CHUNK_RUNS = 4  # runs of one network in a row before the next network's (time_networks)


def _quantiles(sessions: Sequence[Any], rounds: int, runs: int, q: float = NETWORK_QUANTILE) -> List[float]:
    """Milliseconds per session: rounds interleaved over all of them (load on a shared machine hits them
    alike), the ``q`` quantile of every timed run (round 0 only warms up)."""
    feeds = [_random_feed(session) for session in sessions]
    times: List[List[float]] = [[] for _ in sessions]
    for round_ in range(rounds + 1):
        for index, session in enumerate(sessions):
            for _ in range(runs if round_ else 2):  # round 0 warms caches and allocators
                began = time.perf_counter()
                session.run(None, feeds[index])
                if round_:
                    times[index].append(time.perf_counter() - began)
    return [1000.0 * sorted(t)[int(q * (len(t) - 1))] for t in times]


def time_networks(models: Sequence[bytes], threads: int = 1, rounds: int = 5, runs: int = 20) -> List[float]:
    """Milliseconds of whole ONNX networks (quantized ones too) at their declared input shapes, the per-call
    cost included (it is what a caller pays): rounds interleaved, the ``NETWORK_QUANTILE`` of all timed
    runs. The planner's measured speed-ups and the benchmarks' are ratios of two of these timed side by
    side in one session (``compressor.prune.latency.side_by_side``), so both read the same statistic."""
    check_threads(threads)
    # the same runs in rounds of CHUNK_RUNS: load on a shared machine comes and goes within a 20-run round
    # of a 128x128 network (a quarter second), so short rounds let it fall on every network alike
    chunk = min(runs, CHUNK_RUNS)
    return _quantiles([_session(bytes(model), threads) for model in models], max(1, rounds * runs // chunk), chunk)


# --- which machine measured -----------------------------------------------------------------------------

def measured_on() -> str:
    """A human line: machine, processor, onnxruntime version."""
    import onnxruntime as ort

    return f"{platform.machine()} {platform.processor() or platform.node()}, onnxruntime {ort.__version__}".strip()


def device_fingerprint() -> str:
    """What a table's times depend on: CPU architecture, model and feature flags (hashed), cores, and
    the onnxruntime and numpy versions. Two machines with the same fingerprint share cached tables."""
    import numpy as np
    import onnxruntime as ort

    model, flags = _cpu_model_and_flags()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return (f"{platform.machine()}; {model}; flags {digest}; {os.cpu_count() or 1} cores; "
            f"onnxruntime {ort.__version__}; numpy {np.__version__}")


def _cpu_model_and_flags() -> Tuple[str, str]:
    """The CPU's model name and feature flags from /proc/cpuinfo (Linux; x86 and ARM spell them
    differently), else what ``platform`` knows."""
    try:
        text = read_bounded("/proc/cpuinfo", 4 << 20).decode("utf-8", "replace")
    except (OSError, ModelDirError):
        return platform.processor() or "unknown cpu", ""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    model = next((fields[k] for k in ("model name", "model", "hardware", "cpu model", "cpu part") if fields.get(k)),
                 platform.processor() or "unknown cpu")
    flags = fields.get("flags") or fields.get("features") or ""
    return model[:120], " ".join(sorted(flags.split()))


def write_shapes(shapes: Sequence[LayerShape], path: Path) -> None:
    """A shapes file (``{"shapes": [...]}``, one entry per distinct shape) for :func:`read_shapes`."""
    unique = list({s.key(): s for s in shapes}.values())
    atomic_write_text(path, json.dumps({"shapes": [s.to_dict() for s in unique]}) + "\n")


TIMES_FORMAT = "edgeprune-network-times"
MAX_NETWORK_BYTES = 1 << 30  # one ONNX file to time


def network_times_json(ms: Sequence[float], threads: int) -> str:
    """What ``--networks`` writes: each network's milliseconds, in the order given."""
    return json.dumps({"format": TIMES_FORMAT, "version": VERSION, "threads": threads,
                       "device": device_fingerprint(), "ms": list(ms)}) + "\n"


def parse_network_times(data: Any, where: str, count: int) -> List[float]:
    """The milliseconds of :func:`network_times_json` (from a device: untrusted), ``count`` of them."""
    if not isinstance(data, dict) or data.get("format") != TIMES_FORMAT or not isinstance(data.get("ms"), list):
        raise LatencyTableError(f"{where}: not an edgeprune network times file")
    ms = data["ms"]
    if len(ms) != count or not all(_positive_ms(value) for value in ms):
        raise LatencyTableError(f"{where}: expected {count} positive finite times in milliseconds, "
                                f"got {str(ms)[:80]}")
    return [float(value) for value in ms]


def main(argv: Optional[List[str]] = None) -> int:
    """``python3 -m edge_runtime.layer_timing``: measure a table, time whole networks, or print the
    machine's fingerprint, here (the workstation runs it on a device with the deployed runtime)."""
    parser = argparse.ArgumentParser(prog="python3 -m edge_runtime.layer_timing",
                                     description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--shapes", metavar="FILE", help="the layer shapes to time (JSON): writes a latency table")
    what.add_argument("--networks", metavar="ONNX", nargs="+", help="whole ONNX networks to time: writes their ms")
    what.add_argument("--fingerprint", action="store_true", help="print this machine's fingerprint (JSON) and stop")
    parser.add_argument("--engine", choices=ENGINES, default="ort",
                        help="ort (fp32) or ort-int8 (static QDQ int8, as export --quantize int8) (default ort)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model per round (default 20)")
    parser.add_argument("--out", metavar="FILE", help="where the table (or the times) go")
    args = parser.parse_args(argv)
    try:
        if args.fingerprint:
            print(json.dumps({"device": device_fingerprint()}))
            return 0
        if not args.out:
            raise LatencyTableError("give --out FILE")
        check_threads(args.threads)
        if not (1 <= args.rounds <= 100 and 1 <= args.runs <= 10_000):
            raise LatencyTableError("--rounds must be in [1, 100] and --runs in [1, 10000]")
        if args.networks:
            models = [_read_network(Path(name)) for name in args.networks]
            ms = time_networks(models, args.threads, args.rounds, args.runs)
            atomic_write_text(Path(args.out), network_times_json(ms, args.threads))
            print(f"{len(ms)} networks timed: {args.out}")
            return 0
        table = measure(read_shapes(Path(args.shapes)), args.threads, args.rounds, args.runs, args.engine)
        atomic_write_text(Path(args.out), table.to_json())
        print(f"{len(table.ms)} shapes measured ({table.engine}, {table.measured_on}): {args.out}")
        return 0
    except (EdgeRuntimeError, OSError) as error:
        print(f"layer_timing: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # onnxruntime refusing a model it was given: the file's fault, one line
        if type(error).__module__.startswith("onnxruntime"):
            print(f"layer_timing: onnxruntime: {str(error).splitlines()[0][:300]}", file=sys.stderr)
            return 2
        raise


def _read_network(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_NETWORK_BYTES)
    except ModelDirError as error:
        raise LatencyTableError(f"--networks {error}") from None


if __name__ == "__main__":
    sys.exit(main())
