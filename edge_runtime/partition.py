"""Per-part engines: a convolutional stem in onnxruntime, the sparse layers after it on native kernels.

onnxruntime runs convolutions with a spatial output faster than any native kernel (cost.py), and a
CSR kernel runs a very sparse matrix-vector layer (a wide Gemm/MatMul head) several times faster than
onnxruntime's dense one. A model with both — a conv stem and a wide pruned head — runs best split in
two: the graph's nodes up to the cut in one onnxruntime session, the rest as a native program fed
the one tensor that crosses the cut (one copy of one activation per call, nothing else).

The cut sits right before the first Gemm/MatMul weight layer after the last convolution with a
spatial output, and only where exactly one tensor crosses it. The onnxruntime part is model.onnx
itself, rewritten at the wire level (as onnx_embed does): its first nodes, the initializers they
read, and the cut tensor as the only output — bytes of the file this load already checked, so
nothing onnxruntime reads was not checked against the manifest. Only compact (format 3) MODEL_DIRs
with one input are split: their model.onnx holds the manifest's graph node for node.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from edge_runtime import cost
from edge_runtime.errors import ModelDirError
from edge_runtime.graph import Program, compile_nodes, is_weight_node
from edge_runtime.model_format import FORMAT_VERSION_COMPACT
from edge_runtime.onnx_embed import _field, _rewrite
from edge_runtime.onnx_wire import _fields, parse_tensor
from edge_runtime.ops.base import DEFAULT_OPSET

MODEL_GRAPH, GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 7, 1, 5, 12, 13
FLOAT = 1


@dataclass(frozen=True)
class Cut:
    """``nodes[:index]`` run in onnxruntime and produce ``tensor``; ``nodes[index:]`` run natively."""

    index: int
    tensor: str


def find_cut(manifest: Mapping[str, Any], weights: Any) -> Optional[Cut]:
    """Where to split the model (see the module docstring), or None when it has no such place."""
    specs = manifest.get("inputs") or [manifest["input"]]
    if manifest.get("format_version", 1) < FORMAT_VERSION_COMPACT or len(specs) != 1:
        return None
    nodes = manifest["graph"]
    sizes = cost.output_sizes(manifest, weights)
    weight_nodes = [i for i, node in enumerate(nodes) if is_weight_node(node, weights)]
    spatial = [i for i in weight_nodes if nodes[i]["op_type"] == "Conv" and sizes.get(nodes[i]["inputs"][1])
               and int(np.prod(sizes[nodes[i]["inputs"][1]])) > 1]
    if not spatial:
        return None
    index = next((i for i in weight_nodes if i > spatial[-1] and nodes[i]["op_type"] in ("Gemm", "MatMul")), None)
    if index is None:
        return None
    produced = {name for node in nodes[:index] for name in node["outputs"] if name}
    read_later = {name for node in nodes[index:] for name in node["inputs"] if name} | set(manifest["outputs"])
    crossing = produced & read_later
    if len(crossing) != 1 or specs[0]["name"] in read_later:
        return None
    return Cut(index, crossing.pop())


def _value_info(name: str) -> bytes:
    """A ValueInfoProto: ``name``, a float tensor of unknown shape (onnxruntime infers it)."""
    tensor_type = _field(1, 0, FLOAT)
    return _field(1, 2, name.encode("utf-8")) + _field(2, 2, _field(1, 2, tensor_type))


def prefix_onnx(onnx_bytes: bytes, cut: Cut, initializers: set) -> bytes:
    """model.onnx cut down to its first ``cut.index`` nodes, the ``initializers`` they read, and the cut
    tensor as the only output."""
    def graph(value: memoryview) -> bytes:
        out, nodes = [], 0
        for number, wire, field in _fields(value):
            if number == GRAPH_NODE:
                nodes += 1
                if nodes > cut.index:
                    continue
            elif number == GRAPH_INITIALIZER and parse_tensor(field).name not in initializers:
                continue
            elif number in (GRAPH_OUTPUT, GRAPH_VALUE_INFO):
                continue
            out.append(_field(number, wire, field))
        out.append(_field(GRAPH_OUTPUT, 2, _value_info(cut.tensor)))
        return b"".join(out)
    return b"".join(_rewrite(memoryview(onnx_bytes), {MODEL_GRAPH: graph}))


class SplitProgram:
    """The model run in two parts; the interface of ``graph.Program`` that the session uses."""

    def __init__(self, session: Any, cut: Cut, native: Program) -> None:
        self.session, self.cut, self.native = session, cut, native
        self.output_names = native.output_names
        self.steps = native.steps
        self.constants = native.constants

    def run(self, feed: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        try:
            # the compiled session past its Python wrapper's feed checks (the caller checked the feed)
            middle, = getattr(self.session, "_sess", self.session).run([self.cut.tensor], dict(feed), None)
        except Exception as error:  # onnxruntime's errors are untyped; the model was checked at load
            raise ModelDirError(f"onnxruntime failed to run the first part of the model: "
                                f"{' '.join(str(error).split())[:200]}") from None
        return self.native.run({self.cut.tensor: middle})


def build(manifest: Mapping[str, Any], weights: Any, cut: Cut, choose: Callable[[str], str],
          pool: Optional[Executor], threads: int, open_prefix: Callable[[bytes, Dict[str, np.ndarray]], Any],
          onnx_bytes: bytes) -> Tuple[SplitProgram, List[str]]:
    """The split program: onnxruntime on the prefix (``open_prefix(bytes, feeds)``), native kernels of
    ``choose``'s kinds on the rest. Returns it and the prefix's fed initializers."""
    nodes = manifest["graph"]
    read = {name for node in nodes[:cut.index] for name in node["inputs"] if name}
    initializers = {name for name in read if name in weights.tensors}
    fed = sorted(name for name in initializers if weights.info(name).get("onnx") == "fed")
    feeds = {name: np.ascontiguousarray(weights.dense(name), dtype=np.float32) for name in fed}
    session = open_prefix(prefix_onnx(onnx_bytes, cut, initializers), feeds)
    native = compile_nodes(nodes[cut.index:], [cut.tensor], list(manifest["outputs"]), weights, choose, pool,
                           threads, int(manifest.get("opset") or DEFAULT_OPSET))
    return SplitProgram(session, cut, native), fed
