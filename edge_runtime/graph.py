"""From a node list to an executable program of numpy/scipy steps.

Conv, Gemm and MatMul nodes whose float weight is an initializer become weight steps with a dense or
CSR kernel (chosen per layer by the caller); every other node becomes a call into ``ops.OPS`` with
its attributes, the model's opset and its output count. An op that is not there, or a node that
reads an output the op cannot produce, raises UnsupportedOpError naming it before anything runs.

Two entry points: ``compile_graph`` for a MODEL_DIR's manifest and ``Weights``, and ``compile_nodes``
for any node list with its tensors (``ArrayWeights`` holds them in memory; the conformance suite and
the plain-ONNX loader use it).
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp

from edge_runtime.allocation import op_guard
from edge_runtime.conv import conv_forward, conv_kernel
from edge_runtime.errors import UnsupportedOpError
from edge_runtime.kernels import make_kernel
from edge_runtime.ops import CHECKS, OPS, OUTPUTS, Attrs
from edge_runtime.ops.base import DEFAULT_OPSET, is_native, numpy_dtype

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
FLOAT_WEIGHTS = ("float32", "float16")  # what the kernels compute with (float16 is widened at load)


def computes_in_float(info: Mapping[str, Any]) -> bool:
    """Whether a weight reaches the kernels as float32: stored float32/float16, or int8 with a scale
    (a compact MODEL_DIR's ``--quantize int8`` weight, dequantized at load by ``Weights``). Judging by
    the stored dtype alone turned every int8-stored layer into a plain dense op: the int8 export's
    native program then ran no CSR kernel at all (issue 19's 3.3× slowdown)."""
    dtype = info.get("dtype", "float32")
    return dtype in FLOAT_WEIGHTS or (dtype == "int8" and "scale" in info)


class ArrayWeights:
    """Tensors held in memory, with the interface of ``model_dir.Weights``: a node list's
    initializers. ``sparse`` names the ones handed out as CSR (stored sparse, as a MODEL_DIR would)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], sparse: Sequence[str] = ()) -> None:
        self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.tensors = {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                               "storage": "csr" if name in sparse else "dense"}
                        for name, a in self.arrays.items()}

    def info(self, name: str) -> Dict[str, Any]:
        return self.tensors[name]

    def is_sparse(self, name: str) -> bool:
        return self.tensors[name]["storage"] == "csr"

    def csr(self, name: str) -> sp.csr_matrix:
        array = self.arrays[name]
        return sp.csr_matrix(array.reshape(array.shape[0], -1).astype(np.float32))

    def dense(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def nonzeros(self, name: str) -> int:
        return int(np.count_nonzero(self.arrays[name]))

    def close(self) -> None:
        """Nothing to release (``Weights`` closes its npz)."""


@dataclass
class Step:
    """One node: ``run(values)`` maps its input arrays to its output (a tuple for several)."""

    op_type: str
    name: str
    inputs: List[str]
    outputs: List[str]      # "" where the node's output is absent or unused
    run: Callable[[List[Optional[np.ndarray]]], Any]
    weight: Optional[str] = None       # for weight steps: the weight tensor (the plan's key)
    kernel_kind: Optional[str] = None
    kernel: Any = None                 # for weight steps: the kernel (kernels.py) that holds the weight

    @property
    def output(self) -> str:
        return self.outputs[0]


class WeightLayer:
    """A Conv/Gemm/MatMul node with its weight as matrix M ``[out, K]`` (``[out, Cg*k]`` for convs)."""

    def __init__(self, node: Dict[str, Any], weights: Any) -> None:
        self.node = node
        self.op = node["op_type"]
        self.attrs = node.get("attributes") or {}
        self.weight = node["inputs"][1]
        self.weights = weights
        inputs = node["inputs"]
        self.bias_name = inputs[2] if len(inputs) > 2 and inputs[2] else None
        self.shape = [int(d) for d in weights.info(self.weight)["shape"]]
        self.groups = int(self.attrs.get("group", 1)) if self.op == "Conv" else 1

    def _transposed(self) -> bool:
        """Whether M is the stored weight's transpose (Gemm transB=0, MatMul's [K, N])."""
        return self.op == "MatMul" or (self.op == "Gemm" and not self.attrs.get("transB", 0))

    def kernels(self, kind: str, pool: Optional[Executor], threads: int) -> Any:
        """The layer's kernel of ``kind`` (one for all conv groups: see kernels.py)."""
        alpha = float(self.attrs.get("alpha", 1.0)) if self.op == "Gemm" else 1.0
        dense, csr = None, None
        if kind != "dense" or self.weights.is_sparse(self.weight):
            # build from CSR without ever densifying a sparse weight we keep sparse
            csr = self.weights.csr(self.weight)
            csr = csr.T.tocsr() if self._transposed() else csr
            csr = csr * np.float32(alpha) if alpha != 1.0 else csr
        else:
            dense = self.weights.dense(self.weight).astype(np.float32, copy=False).reshape(self.shape[0], -1)
            dense = dense.T if self._transposed() else dense
            dense = dense * np.float32(alpha) if alpha != 1.0 else dense
        if self.op == "Conv":
            return conv_kernel(kind, dense, csr, self.groups, self.shape, pool, threads)
        return make_kernel(kind, dense, csr, pool, threads)

    def bias(self, constants: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        if self.bias_name is None:
            return None
        bias = constants[self.bias_name].astype(np.float32)
        return bias * np.float32(self.attrs.get("beta", 1.0)) if self.op == "Gemm" else bias

    def make_run(self, kernel: Any, bias: Optional[np.ndarray]) -> Callable:
        """The step function for this layer with this kernel."""
        if self.op == "Conv":
            attrs, shape, name = self.attrs, self.shape, self.node.get("name") or self.weight
            weight = np.broadcast_to(np.zeros((), np.float32), shape)  # its shape for the size check, no bytes
            guard = op_guard("Conv", name, attrs)

            def conv(values: List[Optional[np.ndarray]]) -> np.ndarray:
                guard([values[0], weight])  # im2col columns grow with the input
                return conv_forward(values[0], kernel, bias, attrs, shape)
            return conv
        if self.op == "Gemm":
            def gemm(values: List[Optional[np.ndarray]]) -> np.ndarray:
                y = kernel.rows(values[0])
                return y + bias if bias is not None else y
            return gemm

        def matmul(values: List[Optional[np.ndarray]]) -> np.ndarray:
            a = values[0]
            y = kernel.rows(a.reshape(-1, a.shape[-1]))
            return y.reshape(*a.shape[:-1], y.shape[-1])
        return matmul


def is_weight_node(node: Dict[str, Any], weights: Any) -> bool:
    """A Conv/Gemm/MatMul whose float weight (and bias) are initializers and whose form the weight
    kernels compute: anything else runs as a plain op on its (constant) inputs."""
    inputs, op, attrs = node["inputs"], node["op_type"], node.get("attributes") or {}
    if op not in WEIGHT_OPS or len(inputs) < 2 or inputs[1] not in weights.tensors or inputs[0] in weights.tensors:
        return False
    info = weights.info(inputs[1])
    if not computes_in_float(info):
        return False
    rank = len(info["shape"])
    bias_ok = len(inputs) < 3 or not inputs[2] or inputs[2] in weights.tensors
    shape_ok = rank >= 3 if op == "Conv" else rank == 2 and not (op == "Gemm" and attrs.get("transA", 0))
    return bias_ok and shape_ok


@dataclass
class Program:
    """The compiled graph: constants, steps in order, and when each intermediate can be freed."""

    input_names: List[str]
    output_names: List[str]
    constants: Dict[str, np.ndarray]
    steps: List[Step]
    layers: Dict[str, WeightLayer] = field(default_factory=dict)
    frees: List[List[str]] = field(default_factory=list)

    @property
    def input_name(self) -> str:
        return self.input_names[0]

    def run(self, feed: Union[np.ndarray, Mapping[str, np.ndarray]],
            record: Optional[Dict[str, list]] = None) -> List[np.ndarray]:
        """Execute on ``feed`` (a dict by input name, or the one input's array); ``record`` (if given)
        receives each weight step's input values."""
        values: Dict[str, Any] = dict(self.constants)
        values.update(feed if isinstance(feed, Mapping) else {self.input_names[0]: feed})
        for step, frees in zip(self.steps, self.frees):
            args = [values[name] if name else None for name in step.inputs]
            if record is not None and step.weight is not None:
                record[step.name] = args
            result = step.run(args)
            if isinstance(result, tuple):
                for name, value in zip(step.outputs, result):
                    if name:
                        values[name] = np.asarray(value)
            else:
                values[step.outputs[0]] = np.asarray(result)
            for name in frees:
                values.pop(name, None)
        return [values[name] for name in self.output_names]


def _check_node(node: Dict[str, Any], weights: Any, needed: set, opset: int) -> None:
    """Refuse a node the executor cannot run, before loading anything."""
    op = node["op_type"]
    if node.get("domain") not in (None, "", "ai.onnx"):
        raise UnsupportedOpError(op, f"domain {node['domain']}")
    if op not in OPS and not is_weight_node(node, weights):
        raise UnsupportedOpError(op)
    if op in CHECKS:
        CHECKS[op](Attrs(node.get("attributes") or {}, op, opset, len(node["outputs"])))
    produced = 1 if is_weight_node(node, weights) else OUTPUTS.get(op, 1)
    for index, name in enumerate(node["outputs"]):
        if name and name in needed and index >= produced:
            raise UnsupportedOpError(op, f"output {index} ({name!r}) is used; only the first "
                                         f"{produced} output(s) are computed")


def _op_step(node: Dict[str, Any], name: str, opset: int, outputs: List[str]) -> Step:
    op = node["op_type"]
    fn = OPS[op]
    attrs = Attrs(node.get("attributes") or {}, op, opset, len(node["outputs"]), [bool(o) for o in outputs])
    guard = op_guard(op, name, attrs)

    def run(values: List[Optional[np.ndarray]]) -> Any:
        for value in values:  # strings, objects, bfloat16...: said, not computed wrongly
            if value is not None and not is_native(value.dtype):
                raise UnsupportedOpError(op, f"input of dtype {value.dtype}")
        if guard is not None:  # sizes that depend on input values or the batch
            guard(values)
        return fn(values, attrs)
    return Step(op, name, list(node["inputs"]), outputs, run)


def _check_input_types(nodes: Sequence[Dict[str, Any]], input_types: Mapping[str, int]) -> None:
    """A graph input declared with an ONNX type numpy cannot hold (bfloat16, float8, string...) is
    refused by the op that would read it: its array could only be a reinterpretation."""
    for node in nodes:
        for name in node["inputs"]:
            if name in input_types:
                numpy_dtype(int(input_types[name]), node["op_type"])


def compile_nodes(nodes: Sequence[Dict[str, Any]], input_names: Sequence[str], output_names: Sequence[str],
                  weights: Any, choose: Callable[[str], str], pool: Optional[Executor] = None,
                  threads: int = 1, opset: int = DEFAULT_OPSET,
                  input_types: Optional[Mapping[str, int]] = None) -> Program:
    """Build a Program from nodes (dicts: op_type, inputs, outputs, attributes, domain, name) and the
    initializers in ``weights``; ``choose(weight_name)`` gives each weight layer's kernel kind.
    ``input_types`` (optional): the graph inputs' declared ONNX element types."""
    needed = set(output_names) | {name for node in nodes for name in node["inputs"] if name}
    for node in nodes:
        _check_node(node, weights, needed, opset)
    _check_input_types(nodes, input_types or {})
    weight_nodes = [is_weight_node(node, weights) for node in nodes]
    weight_names = {node["inputs"][1] for node, w in zip(nodes, weight_nodes) if w}
    constants = {name: weights.dense(name) for node in nodes for name in node["inputs"]
                 if name in weights.tensors and name not in weight_names}
    constants.update({name: weights.dense(name) for name in output_names if name in weights.tensors})
    steps, layers = [], {}
    for index, (node, is_weight) in enumerate(zip(nodes, weight_nodes)):
        name = node.get("name") or f"{node['op_type']}_{index}"
        outputs = [o if o in needed else "" for o in node["outputs"]]
        outputs[0] = outputs[0] or node["outputs"][0]
        if is_weight:
            layer = WeightLayer(node, weights)
            kind = choose(layer.weight)
            kernel = layer.kernels(kind, pool, threads)
            run = layer.make_run(kernel, layer.bias(constants))
            steps.append(Step(node["op_type"], name, node["inputs"][:1], outputs, run, layer.weight, kind, kernel))
            layers[name] = layer
        else:
            steps.append(_op_step(node, name, opset, outputs))
    outputs = list(output_names)
    return Program(list(input_names), outputs, constants, steps, layers,
                   _free_lists(steps, set(outputs) | set(constants)))


def check_supported(manifest: Dict[str, Any], weights: Any) -> None:
    """Raise UnsupportedOpError (naming the op) when the native program cannot run a MODEL_DIR's graph,
    without building anything: the checks ``compile_graph`` starts with."""
    nodes = manifest["graph"]
    needed = set(manifest["outputs"]) | {name for node in nodes for name in node["inputs"] if name}
    for node in nodes:
        _check_node(node, weights, needed, int(manifest.get("opset") or DEFAULT_OPSET))


def compile_graph(manifest: Dict[str, Any], weights: Any, choose: Callable[[str], str],
                  pool: Optional[Executor], threads: int) -> Program:
    """Build a MODEL_DIR's Program; ``choose(weight_name)`` gives each weight layer's kernel kind."""
    specs = manifest.get("inputs") or [manifest["input"]]
    return compile_nodes(manifest["graph"], [spec["name"] for spec in specs], list(manifest["outputs"]),
                         weights, choose, pool, threads, int(manifest.get("opset") or DEFAULT_OPSET))


def _free_lists(steps: List[Step], keep: set) -> List[List[str]]:
    """For each step, the intermediates nothing later reads: dropping them bounds peak memory."""
    last_use: Dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.inputs:
            last_use[name] = index
    frees: List[List[str]] = [[] for _ in steps]
    for name, index in last_use.items():
        if name not in keep:
            frees[index].append(name)
    return frees
