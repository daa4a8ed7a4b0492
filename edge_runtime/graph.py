"""From the manifest's node list to an executable program of numpy/scipy steps.

Conv, Gemm and MatMul nodes whose weight is an initializer become weight steps with a dense or CSR
kernel (chosen per layer by the caller); every other node becomes a call into ``ops.OPS``. An op that
is not there raises UnsupportedOpError naming it, before anything runs.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from edge_runtime.errors import UnsupportedOpError
from edge_runtime.kernels import make_kernel
from edge_runtime.model_dir import Weights
from edge_runtime.ops import OPS
from edge_runtime.windows import im2col, resolve_pads

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Step:
    """One node: ``run(values)`` maps its input arrays to its (first) output."""

    op_type: str
    name: str
    inputs: List[str]
    output: str
    run: Callable[[List[Optional[np.ndarray]]], np.ndarray]
    weight: Optional[str] = None       # for weight steps: the weight tensor (the plan's key)
    kernel_kind: Optional[str] = None


class WeightLayer:
    """A Conv/Gemm/MatMul node with its weight as matrix M ``[out, K]`` (per group for grouped convs)."""

    def __init__(self, node: Dict[str, Any], weights: Weights) -> None:
        self.node = node
        self.op = node["op_type"]
        self.attrs = node["attributes"]
        self.weight = node["inputs"][1]
        self.weights = weights
        inputs = node["inputs"]
        bias_name = inputs[2] if len(inputs) > 2 and inputs[2] else None
        self.bias_name = bias_name
        self.shape = [int(d) for d in weights.info(self.weight)["shape"]]
        if self.op == "Gemm" and self.attrs.get("transA", 0):
            raise UnsupportedOpError("Gemm", "transA=1 with a weight initializer")
        if self.op == "MatMul" and len(self.shape) != 2:
            raise UnsupportedOpError("MatMul", "weight of rank other than 2")
        if self.op == "Conv" and len(self.shape) < 3:
            raise UnsupportedOpError("Conv", "weight of rank < 3")

    def _transposed(self) -> bool:
        """Whether M is the stored weight's transpose (Gemm transB=0, MatMul's [K, N])."""
        return self.op == "MatMul" or (self.op == "Gemm" and not self.attrs.get("transB", 0))

    def kernels(self, kind: str, pool: Optional[Executor], threads: int) -> list:
        """The kernel(s) of ``kind``: one per conv group, otherwise one."""
        groups = int(self.attrs.get("group", 1)) if self.op == "Conv" else 1
        alpha = float(self.attrs.get("alpha", 1.0)) if self.op == "Gemm" else 1.0
        use_csr = kind != "dense" or self.weights.is_sparse(self.weight)
        if use_csr:  # build from CSR without ever densifying a sparse weight we keep sparse
            matrix = self.weights.csr(self.weight)
            matrix = matrix.T.tocsr() if self._transposed() else matrix
            matrix = matrix * np.float32(alpha) if alpha != 1.0 else matrix
            parts = [matrix[g * matrix.shape[0] // groups:(g + 1) * matrix.shape[0] // groups]
                     for g in range(groups)] if groups > 1 else [matrix]
            return [make_kernel(kind, None, p.tocsr(), pool, threads) for p in parts]
        dense = self.weights.dense(self.weight).reshape(self.shape[0], -1)
        dense = dense.T if self._transposed() else dense
        dense = dense * np.float32(alpha) if alpha != 1.0 else dense
        rows = dense.shape[0] // groups
        return [make_kernel(kind, dense[g * rows:(g + 1) * rows], None, pool, threads) for g in range(groups)]

    def bias(self, constants: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        if self.bias_name is None:
            return None
        bias = constants[self.bias_name].astype(np.float32)
        return bias * np.float32(self.attrs.get("beta", 1.0)) if self.op == "Gemm" else bias

    def make_run(self, kernels: list, bias: Optional[np.ndarray]) -> Callable:
        """The step function for this layer with these kernels."""
        if self.op == "Conv":
            return _conv_run(kernels, bias, self.attrs, self.shape)
        kernel = kernels[0]
        if self.op == "Gemm":
            bias_row = None if bias is None else bias.reshape(1, -1) if bias.ndim == 1 else bias

            def gemm(values: List[Optional[np.ndarray]]) -> np.ndarray:
                y = kernel.rows(values[0])
                return y + bias_row if bias_row is not None else y
            return gemm

        def matmul(values: List[Optional[np.ndarray]]) -> np.ndarray:
            a = values[0]
            y = kernel.rows(a.reshape(-1, a.shape[-1]))
            return y.reshape(*a.shape[:-1], y.shape[-1])
        return matmul


def _conv_run(kernels: list, bias: Optional[np.ndarray], attrs: Dict[str, Any], shape: Sequence[int]):
    kernel_shape = list(attrs.get("kernel_shape", shape[2:]))
    rank = len(kernel_shape)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    groups = len(kernels)
    out_channels = shape[0]
    bias_col = None if bias is None else bias.reshape(-1, 1)

    def conv(values: List[Optional[np.ndarray]]) -> np.ndarray:
        x = values[0]
        pads = resolve_pads("Conv", attrs, x.shape[2:], kernel_shape, strides, dilations)
        in_per_group = x.shape[1] // groups
        results = []
        for image in x:
            parts = []
            for g, kernel in enumerate(kernels):
                part = image[g * in_per_group:(g + 1) * in_per_group] if groups > 1 else image
                cols, out_size = im2col(part, kernel_shape, strides, pads, dilations)
                parts.append(kernel.cols(cols))
            y = parts[0] if groups == 1 else np.concatenate(parts, axis=0)
            if bias_col is not None:
                y = y + bias_col
            results.append(y.reshape(out_channels, *out_size))
        return np.stack(results) if len(results) > 1 else results[0][None]
    return conv


@dataclass
class Program:
    """The compiled graph: constants, steps in order, and when each intermediate can be freed."""

    input_name: str
    output_names: List[str]
    constants: Dict[str, np.ndarray]
    steps: List[Step]
    layers: Dict[str, WeightLayer] = field(default_factory=dict)
    frees: List[List[str]] = field(default_factory=list)

    def run(self, x: np.ndarray, record: Optional[Dict[str, list]] = None) -> List[np.ndarray]:
        """Execute on input ``x``; ``record`` (if given) receives each weight step's input values."""
        values: Dict[str, Any] = dict(self.constants)
        values[self.input_name] = x
        for step, frees in zip(self.steps, self.frees):
            args = [values[name] if name else None for name in step.inputs]
            if record is not None and step.weight is not None:
                record[step.name] = args
            values[step.output] = step.run(args)
            for name in frees:
                values.pop(name, None)
        return [values[name] for name in self.output_names]


def _is_weight_node(node: Dict[str, Any], weights: Weights) -> bool:
    inputs = node["inputs"]
    bias_ok = len(inputs) < 3 or not inputs[2] or inputs[2] in weights.tensors
    return (node["op_type"] in WEIGHT_OPS and len(inputs) > 1 and inputs[1] in weights.tensors
            and inputs[0] not in weights.tensors and bias_ok)


def compile_graph(manifest: Dict[str, Any], weights: Weights, choose: Callable[[str], str],
                  pool: Optional[Executor], threads: int) -> Program:
    """Build a Program; ``choose(weight_name)`` gives each weight layer's kernel kind."""
    nodes = manifest["graph"]
    for node in nodes:  # fail before loading anything when an op cannot run
        if node.get("domain") not in (None, "", "ai.onnx"):
            raise UnsupportedOpError(node["op_type"], f"domain {node['domain']}")
        if node["op_type"] not in OPS and not _is_weight_node(node, weights):
            raise UnsupportedOpError(node["op_type"])
        if len([o for o in node["outputs"] if o]) > 1:
            raise UnsupportedOpError(node["op_type"], "more than one output")
    weight_names = {node["inputs"][1] for node in nodes if _is_weight_node(node, weights)}
    constants = {name: weights.dense(name) for node in nodes for name in node["inputs"]
                 if name in weights.tensors and name not in weight_names}
    steps, layers = [], {}
    for index, node in enumerate(nodes):
        name = node.get("name") or f"{node['op_type']}_{index}"
        if _is_weight_node(node, weights):
            layer = WeightLayer(node, weights)
            kind = choose(layer.weight)
            run = layer.make_run(layer.kernels(kind, pool, threads), layer.bias(constants))
            steps.append(Step(node["op_type"], name, node["inputs"][:1], node["outputs"][0], run,
                              layer.weight, kind))
            layers[name] = layer
        else:
            fn, attrs = OPS[node["op_type"]], node["attributes"]
            steps.append(Step(node["op_type"], name, list(node["inputs"]), node["outputs"][0],
                              lambda values, fn=fn, attrs=attrs: fn(values, attrs)))
    outputs = list(manifest["outputs"])
    return Program(manifest["input"]["name"], outputs, constants, steps, layers,
                   _free_lists(steps, set(outputs) | set(constants)))


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
