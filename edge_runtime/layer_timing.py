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
import json
import math
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
ENGINES = ("ort", "ort-int8")
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


@dataclass
class LatencyTable:
    """Milliseconds per layer shape (by :meth:`LayerShape.key`), and how they were measured."""

    ms: Dict[str, float]
    threads: int = 1
    measured_on: str = ""
    engine: str = "ort"  # "ort" (fp32) or "ort-int8" (static QDQ, per-channel symmetric int8 weights)
    call_ms: float = 0.0  # fixed cost of one session.run() call (already subtracted from every entry)
    node_ms: float = 0.0  # fixed cost of each further node inside one session
    device: str = ""  # fingerprint of the machine and runtime versions that measured it

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
    data = _read_json(path, what)
    where = f"{what} {path}"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LatencyTableError(f"{where}: not an edgeprune latency table (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise LatencyTableError(f"{where}: version {data.get('version')!r} is not {VERSION}")
    threads, entries = data.get("threads", 1), data.get("ms")
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024:
        raise LatencyTableError(f"{where}: \"threads\" must be an integer in [1, 1024]")
    if not isinstance(entries, dict) or not entries or len(entries) > MAX_ENTRIES:
        raise LatencyTableError(f"{where}: \"ms\" must map 1 to {MAX_ENTRIES} layer shapes to milliseconds")
    for key, value in entries.items():
        if len(key) > 200 or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not 0 < value < 1e6:
            raise LatencyTableError(f"{where}: entry {key[:80]!r} must be a positive finite number of "
                                    f"milliseconds, got {str(value)[:40]}")
    measured_on = data.get("measured_on", "")
    engine = data.get("engine", "ort")
    if engine not in ENGINES:
        raise LatencyTableError(f"{where}: \"engine\" must be one of {', '.join(ENGINES)}")
    fixed = {name: data.get(name, 0.0) for name in ("call_ms", "node_ms")}
    for name, value in fixed.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e4:
            raise LatencyTableError(f"{where}: \"{name}\" must be a finite number of milliseconds >= 0")
    device = data.get("device", "")
    return LatencyTable({k: float(v) for k, v in entries.items()}, threads,
                        measured_on if isinstance(measured_on, str) else "", engine,
                        float(fixed["call_ms"]), float(fixed["node_ms"]), device[:500] if isinstance(device, str) else "")


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


# --- measuring (numpy, onnxruntime) -------------------------------------------------------------------
# A one-layer ONNX model is a few protobuf fields: written here by hand, so that measuring needs no
# `onnx` package — a Raspberry Pi's edge-runtime venv has numpy and onnxruntime only.

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


def _tensor(name: str, array: Any) -> bytes:  # TensorProto: dims, data_type FLOAT, name, raw_data
    return (b"".join(_field(1, int(d)) for d in array.shape) + _field(2, 1) + _field(8, name)
            + _field(9, array.astype("<f4").tobytes()))


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


def layer_onnx(shape: LayerShape) -> bytes:
    """A one-node ONNX model of ``shape`` with random weights (Conv, or MatMul+Add for Linear)."""
    import numpy as np

    rng = np.random.default_rng(0)
    if shape.op == "linear":
        x_shape = [1, *shape.spatial, shape.cin]
        weights = [_tensor("W", rng.standard_normal((shape.cin, shape.cout))), _tensor("B", rng.standard_normal(shape.cout))]
        nodes = [_node("MatMul", ["X", "W"], ["XW"]), _node("Add", ["XW", "B"], ["Y"])]
    else:
        x_shape = [1, shape.cin, *shape.spatial]
        w_shape = (shape.cout, shape.cin // shape.groups, *shape.kernel)
        weights = [_tensor("W", rng.standard_normal(w_shape)), _tensor("B", rng.standard_normal(shape.cout))]
        nodes = [_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=list(shape.kernel), strides=list(shape.stride),
                       pads=list(shape.padding), dilations=list(shape.dilation), group=shape.groups)]
    graph = (b"".join(_field(1, node) for node in nodes) + _field(2, "layer")
             + b"".join(_field(5, w) for w in weights) + _field(11, _value_info("X", x_shape))
             + _field(12, _value_info("Y", None)))
    # ir_version 8 and opset 17: readable by every onnxruntime a Pi may have (>= 1.10)
    return _field(1, 8) + _field(8, _field(1, "") + _field(2, 17)) + _field(7, graph)


# The smallest layer there is: its time is onnxruntime's fixed cost of one run() call, which a layer
# inside a whole network does not pay. Subtracted from every entry so that ratios of predicted
# latencies (--target-speedup) are ratios of compute; differences (what the allocation uses) are unchanged.
OVERHEAD_SHAPE = LayerShape("conv", 1, 1, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)
FLOOR_MS = 1e-4  # entries stay positive: a layer never costs nothing


def measure(shapes: Sequence[LayerShape], threads: int = 1, rounds: int = 5, runs: int = 20,
            engine: str = "ort") -> LatencyTable:
    """Time every distinct shape in onnxruntime at batch 1 with ``threads`` intra-op threads.

    Rounds are interleaved over all shapes (load on a shared machine hits them alike); a shape's
    figure is the smallest of its per-round medians, the least disturbed estimate of its own cost,
    less the fixed cost of a call (``OVERHEAD_SHAPE``'s figure, kept as ``call_ms``). ``node_ms`` is
    the slope of a chain of cheap nodes: what each node a whole network runs besides its layers costs.
    Only fp32 ("ort") one-layer models are written here; an int8 table is measured from models the
    workstation quantized (``compressor.prune.latency.LocalLatency``) with :func:`time_networks`.
    """
    if engine != "ort":
        raise LatencyTableError(f"engine {engine!r}: this runtime measures one-layer tables for \"ort\" only")
    unique = list({s.key(): s for s in shapes}.values())
    models = [layer_onnx(OVERHEAD_SHAPE), chain_onnx(1), chain_onnx(1 + CHAIN)] + [layer_onnx(s) for s in unique]
    times = time_networks(models, threads, rounds, runs)
    call_ms, node_ms = times[0], max(0.0, (times[2] - times[1]) / CHAIN)
    ms = {shape.key(): max(FLOOR_MS, t - call_ms) for shape, t in zip(unique, times[3:])}
    return LatencyTable(ms, threads, measured_on(), engine, call_ms, node_ms, fingerprint(threads))


CHAIN = 32  # nodes in the longer chain that node_ms is the slope of


def chain_onnx(nodes: int) -> bytes:
    """``nodes`` Neg nodes in a row on a [1, 8] tensor: nothing to compute, only per-node cost
    (Neg: no onnxruntime optimizer fuses or removes it)."""
    names = ["X", *[f"t{i}" for i in range(1, nodes)], "Y"]
    graph = (b"".join(_field(1, _node("Neg", [a], [b])) for a, b in zip(names, names[1:])) + _field(2, "chain")
             + _field(11, _value_info("X", [1, 8])) + _field(12, _value_info("Y", None)))
    return _field(1, 8) + _field(8, _field(1, "") + _field(2, 17)) + _field(7, graph)


def measured_on() -> str:
    import onnxruntime as ort

    return f"{platform.machine()} {platform.processor() or platform.node()}, onnxruntime {ort.__version__}".strip()


def fingerprint(threads: int) -> str:
    """The machine, its CPU (model name and flags, hashed), cores, and the runtime's versions."""
    import hashlib
    import os

    import numpy as np
    import onnxruntime as ort

    cpu = ""
    try:
        with open("/proc/cpuinfo", "rb") as handle:
            lines = handle.read(1 << 20).decode("utf-8", "replace").splitlines()
        cpu = "\n".join(sorted({l for l in lines if l.split(":")[0].strip() in ("model name", "flags", "Features",
                                                                             "CPU part", "Model")}))
    except OSError:
        pass
    digest = hashlib.sha256(cpu.encode()).hexdigest()[:16]
    return (f"{platform.machine()} cpu:{digest} cores:{os.cpu_count()} threads:{threads} "
            f"onnxruntime:{ort.__version__} numpy:{np.__version__}")


def _input_feeds(session: Any) -> Dict[str, Any]:
    """Random inputs of the declared shapes (dynamic dims = 1) and types (float, int, bool)."""
    import numpy as np

    rng = np.random.default_rng(1)
    feeds = {}
    for item in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in item.shape]
        kind = item.type[len("tensor("):-1] if item.type.startswith("tensor(") else "float"
        if kind in ("float", "double", "float16"):
            dtype = {"float": np.float32, "double": np.float64, "float16": np.float16}[kind]
            feeds[item.name] = rng.standard_normal(dims).astype(dtype)
        elif kind == "bool":
            feeds[item.name] = np.zeros(dims, dtype=bool)
        else:
            feeds[item.name] = np.zeros(dims, dtype=np.dtype(kind if kind != "int" else "int32"))
    return feeds


def time_networks(models: Sequence[bytes], threads: int = 1, rounds: int = 5, runs: int = 20) -> List[float]:
    """p50 milliseconds of whole ONNX models (serialized; quantized ones too) at batch 1: random inputs
    of the declared shapes, rounds interleaved over the models, the smallest of the per-round medians
    (the call's fixed cost is included: this is what a caller of ``run()`` waits)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    sessions, feeds = [], []
    for data in models:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        sessions.append(session)
        feeds.append(_input_feeds(session))
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


def write_shapes(shapes: Sequence[LayerShape], path: Path) -> None:
    """A shapes file (``{"shapes": [...]}``, one entry per distinct shape) for :func:`read_shapes`."""
    unique = list({s.key(): s for s in shapes}.values())
    atomic_write_text(path, json.dumps({"shapes": [s.to_dict() for s in unique]}) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    """``python3 -m edge_runtime.layer_timing --shapes FILE --out TABLE``: measure a table here."""
    parser = argparse.ArgumentParser(prog="python3 -m edge_runtime.layer_timing",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", metavar="FILE", required=True, help="the layer shapes to time (JSON)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", metavar="FILE", required=True, help="where the measured table goes")
    args = parser.parse_args(argv)
    try:
        if args.threads < 1:
            raise LatencyTableError("--threads must be >= 1")
        table = measure(read_shapes(Path(args.shapes)), args.threads)
        atomic_write_text(Path(args.out), table.to_json())
        print(f"{len(table.ms)} shapes measured ({table.measured_on}): {args.out}")
        return 0
    except (EdgeRuntimeError, OSError) as error:
        print(f"layer_timing: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
