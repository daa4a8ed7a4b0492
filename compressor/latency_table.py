"""Latency lookup tables: how long one Conv/Linear layer of a given shape takes in onnxruntime.

MACs predict onnxruntime latency poorly (channel counts that fill the CPU's vector blocks run far
faster than fewer MACs that do not), so ``--allocate latency`` decides how many channels each group
keeps from measured times instead (NetAdapt, Yang et al. 2018; HALP, Shen et al. 2022). A table maps a
layer *shape* (op, input and output widths, kernel, stride, padding, groups, input size) to the p50
milliseconds of that layer alone, run at batch 1 in onnxruntime on the machine that measured it.

A run stores the table it used as ``RUN_DIR/latency_table.json`` (so ``--resume`` plans the same),
and ``--latency-table FILE`` reads one measured elsewhere, e.g. on the Raspberry Pi::

    python3 -m compressor.latency_table --model resnet20 --shapes-out shapes.json   # dev machine (torch)
    scp compressor/latency_table.py shapes.json pi:                                   # the file runs alone
    ssh pi ~/.edgeprune/venv/bin/python latency_table.py --shapes shapes.json --out table.json  # numpy + onnxruntime
    edgeprune compress --model resnet20 --structure channels --allocate latency --latency-table table.json ...

This module imports neither torch nor compressor's training code: measuring needs numpy and
onnxruntime only (it writes its one-layer ONNX models itself), what a device's edge-runtime venv has. A table is untrusted input: every field is checked, and any fault is one
``LatencyTableError`` line.
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

try:
    from compressor.errors import CompressorError, ConfigError
except ImportError:  # copied alone to a device (scp latency_table.py pi:): measuring needs nothing else
    class CompressorError(Exception):  # type: ignore[no-redef]
        """Stand-in for compressor.errors.CompressorError outside the package."""

    class ConfigError(CompressorError):  # type: ignore[no-redef]
        """Stand-in for compressor.errors.ConfigError outside the package."""

FORMAT = "edgeprune-latency-table"
VERSION = 1
MAX_BYTES = 16 * 1024 * 1024  # a table is a few hundred entries; refuse to parse a huge file
MAX_ENTRIES = 100_000
RUN_DIR_NAME = "latency_table.json"


class LatencyTableError(ConfigError):
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

    def missing(self, shapes: Iterable[LayerShape]) -> List[str]:
        """Keys of ``shapes`` the table has no time for (sorted, unique)."""
        return sorted({s.key() for s in shapes} - set(self.ms))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "threads": self.threads,
                           "measured_on": self.measured_on, "ms": dict(sorted(self.ms.items()))}, indent=1) + "\n"


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
    return LatencyTable({k: float(v) for k, v in entries.items()}, threads,
                        measured_on if isinstance(measured_on, str) else "")


def read_shapes(path: Path) -> List[LayerShape]:
    """The shapes file ``--shapes-out`` wrote (``{"shapes": [...]}``), validated."""
    data = _read_json(path, "--shapes")
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) or \
            not 0 < len(data["shapes"]) <= MAX_ENTRIES:
        raise LatencyTableError(f"--shapes {path}: expected {{\"shapes\": [...]}} with 1 to {MAX_ENTRIES} shapes")
    return [LayerShape.from_dict(item, f"--shapes {path}") for item in data["shapes"]]


def _read_json(path: Path, what: str) -> Any:
    try:
        size = Path(path).stat().st_size
        if size > MAX_BYTES:
            raise LatencyTableError(f"{what} {path}: {size} bytes is too large for a latency table")
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except LatencyTableError:
        raise
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


def measure(shapes: Sequence[LayerShape], threads: int = 1, rounds: int = 5, runs: int = 20) -> LatencyTable:
    """Time every distinct shape in onnxruntime at batch 1 with ``threads`` intra-op threads.

    Rounds are interleaved over all shapes (load on a shared machine hits them alike); a shape's
    figure is the smallest of its per-round medians, the least disturbed estimate of its own cost,
    less the fixed cost of a call (``OVERHEAD_SHAPE``'s figure).
    """
    import numpy as np
    import onnxruntime as ort

    unique = [OVERHEAD_SHAPE, *{s.key(): s for s in shapes}.values()]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    sessions, feeds = [], []
    for shape in unique:
        session = ort.InferenceSession(layer_onnx(shape), options, providers=["CPUExecutionProvider"])
        dims = [1, *shape.spatial, shape.cin] if shape.op == "linear" else [1, shape.cin, *shape.spatial]
        sessions.append(session)
        feeds.append({"X": np.random.default_rng(1).standard_normal(dims).astype(np.float32)})
    medians: List[List[float]] = [[] for _ in unique]
    for round_ in range(rounds + 1):
        for index, session in enumerate(sessions):
            times = []
            for _ in range(runs if round_ else 2):  # round 0 warms caches and allocators
                began = time.perf_counter()
                session.run(None, feeds[index])
                times.append(time.perf_counter() - began)
            if round_:
                medians[index].append(statistics.median(times))
    overhead = 1000.0 * min(medians[0])
    ms = {shape.key(): max(FLOOR_MS, 1000.0 * min(m) - overhead) for shape, m in zip(unique[1:], medians[1:])}
    return LatencyTable(ms, threads, f"{platform.machine()} {platform.processor() or platform.node()}, "
                                     f"onnxruntime {ort.__version__}".strip())


def write_shapes(shapes: Sequence[LayerShape], path: Path) -> None:
    unique = list({s.key(): s for s in shapes}.values())
    Path(path).write_text(json.dumps({"shapes": [s.to_dict() for s in unique]}) + "\n")


def model_shapes(model_name: str, multiple: int, min_channels: Optional[int], exclude: Sequence[str]):
    """Every layer shape ``--allocate latency`` may ask about for this model (needs torch)."""
    from compressor.channel_allocation import LatencyModel
    from compressor.channels import example_input, find_groups
    from compressor.models import build_model, input_shape_of

    model = build_model(model_name)
    example = example_input(input_shape_of(model))
    groups = find_groups(model, example, exclude)
    return LatencyModel(model, example, groups, multiple, min_channels).shapes_needed()


def main(argv: Optional[List[str]] = None) -> int:
    """``python3 -m compressor.latency_table``: list a model's layer shapes, or measure a table."""
    parser = argparse.ArgumentParser(prog="python3 -m compressor.latency_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a built-in model or file.py:factory (needs torch)")
    parser.add_argument("--channel-multiple", type=int, default=8)
    parser.add_argument("--min-channels", type=int, default=None)
    parser.add_argument("--exclude", default="", help="comma separated layers kept whole (as compress)")
    parser.add_argument("--shapes-out", metavar="FILE", help="write the model's layer shapes here and stop")
    parser.add_argument("--shapes", metavar="FILE", help="measure the shapes in FILE (no torch needed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", metavar="FILE", help="where the measured table goes")
    args = parser.parse_args(argv)
    try:
        if (args.model is None) == (args.shapes is None):
            raise LatencyTableError("give --model or --shapes (one of them)")
        if args.shapes:
            shapes = read_shapes(Path(args.shapes))
        else:
            exclude = [e for e in args.exclude.split(",") if e]
            shapes = model_shapes(args.model, args.channel_multiple, args.min_channels, exclude)
        if args.shapes_out:
            write_shapes(shapes, Path(args.shapes_out))
            print(f"{len({s.key() for s in shapes})} shapes: {args.shapes_out}")
            return 0
        if not args.out or args.threads < 1:
            raise LatencyTableError("give --out FILE for the table (and --threads >= 1)")
        table = measure(shapes, args.threads)
        Path(args.out).write_text(table.to_json())
        print(f"{len(table.ms)} shapes measured ({table.measured_on}): {args.out}")
        return 0
    except (CompressorError, OSError) as error:
        print(f"latency_table: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
