"""From a PyTorch module to a clean ONNX graph: export, fold BatchNorm, name the layers.

After these steps every weight lives in ``graph.initializer`` under a readable name (``fc.weight``,
``blocks.0.conv1.weight``), there are no ``Constant`` nodes nor Identity nodes on initializers, and no
BatchNormalization follows a Conv.
The node list can then be written to manifest.json for a device that has no ``onnx`` package.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressor.errors import ExportError
from compressor.prune.examples import no_cache

OPSET = 17
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")  # layers the native kernels run with a CSR or dense weight
RNN_OPS = ("GRU", "LSTM", "RNN")  # W (input 1) and R (input 2) are the pruned weight_ih / weight_hh
# ops whose weights are pruned and may be stored as CSR (onnxruntime gets them dense at load)
STORED_WEIGHT_OPS = (*WEIGHT_OPS, "Gather", *RNN_OPS)


def torch_to_onnx(model: Any, inputs: Dict[str, Any], output: Optional[str] = None,
                  positional: bool = True) -> Tuple[onnx.ModelProto, str]:
    """Export an eval-mode module with the TorchScript exporter (a plain graph), dynamic batch axis.

    ``inputs`` maps each graph input's name to its example tensor, in the forward's parameter order;
    they are passed positionally, or as keyword arguments when not ``positional``. The model may
    return a tensor, tuple, dict or ModelOutput: only the output ``output`` (see
    ``compressor.train.batches.pick_output``) is kept, and the graph is cut down to what computes it.
    Returns ``(model, the kept output's name)``: ``output`` for a model returning one tensor.
    """
    import torch  # the workstation side only; keeps this module importable for inspection

    from compressor.train.batches import pick_output

    args = tuple(inputs.values()) if positional else ()
    kwargs = {} if positional else dict(inputs)
    try:
        with torch.no_grad():
            produced = model(*args, **kwargs)
        chosen, _ = pick_output(produced, output)
    except ExportError:
        raise
    except Exception as error:  # the user's model does not take these inputs, or returns no tensor
        raise ExportError(f"the model cannot run on the example inputs: {type(error).__name__}: "
                          f"{str(error).strip()[:300]}") from error
    axes = {name: {0: "batch"} for name in [*inputs, chosen]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _only_output(model, output), no_cache(model):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, args, buffer, kwargs=kwargs or None, dynamo=False, opset_version=OPSET,
                              input_names=list(inputs), output_names=[chosen],
                              dynamic_axes=axes, do_constant_folding=True)
        except Exception as error:  # an op torch cannot export is the user's model's limitation
            raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {error}") from error
    exported = onnx.load_from_string(buffer.getvalue())
    keep_only_output(exported.graph, chosen)
    return exported, chosen


@contextlib.contextmanager
def _only_output(model: Any, output: Optional[str]) -> Iterator[None]:
    """While exporting, ``model``'s forward returns only the chosen output tensor: the rest of a tuple,
    dict or ModelOutput (a Hugging Face cache object, hidden states) is never traced. The instance's
    forward is wrapped rather than the module, so layer scopes and weight names stay the model's own."""
    from compressor.train.batches import pick_output

    original = model.forward

    @functools.wraps(original)  # the signature stays the forward's: keyword inputs keep their order
    def forward(*args: Any, **kwargs: Any) -> Any:
        return pick_output(original(*args, **kwargs), output)[1]

    model.forward = forward
    try:
        yield
    finally:
        del model.forward  # the class's forward again


def keep_only_output(graph: onnx.GraphProto, name: str) -> None:
    """Drop every graph output but ``name`` and every node that no longer contributes to it."""
    kept = [o for o in graph.output if o.name == name]
    if not kept:
        have = ", ".join(o.name for o in graph.output)
        raise ExportError(f"the exported graph has no output {name!r} (it has {have})")
    del graph.output[:]
    graph.output.extend(kept)
    needed, live = {name}, []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(live))
    prune_unused_initializers(graph)


def initializers(graph: onnx.GraphProto) -> Dict[str, np.ndarray]:
    """Every initializer as a numpy array, by name."""
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _replace_nodes_by_initializers(graph: onnx.GraphProto,
                                   tensor_of: Callable[[onnx.NodeProto], Optional[onnx.TensorProto]]) -> None:
    """Drop every node for which ``tensor_of`` names a tensor; that tensor, renamed to the node's
    output, becomes an initializer instead (so every value lives in weights.npz)."""
    keep = []
    for node in graph.node:
        source = tensor_of(node)
        if source is None:
            keep.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(source)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    del graph.node[:]
    graph.node.extend(keep)


_CONSTANT_LISTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                   "value_ints": np.int64}


def constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Turn ``Constant`` nodes (``value`` or ``value_float(s)``/``value_int(s)``) into initializers, so
    every tensor is an initializer the runtime finds in weights.npz."""
    def constant_value(node: onnx.NodeProto) -> Optional[onnx.TensorProto]:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            return None
        attribute = node.attribute[0]
        if attribute.name == "value":
            return attribute.t
        if attribute.name in _CONSTANT_LISTS:
            array = np.array(helper.get_attribute_value(attribute), dtype=_CONSTANT_LISTS[attribute.name])
            return numpy_helper.from_array(array)
        return None

    _replace_nodes_by_initializers(graph, constant_value)


def inline_identities(graph: onnx.GraphProto) -> None:
    """Replace ``Identity`` nodes on initializers by an initializer of their own.

    The TorchScript exporter de-duplicates equal initializers (say, several all-zero conv biases) and
    hands each user an Identity of the shared one; a layer's weight and bias should be its own tensors.
    """
    tensors = {t.name: t for t in graph.initializer}
    _replace_nodes_by_initializers(
        graph, lambda node: tensors.get(node.input[0]) if node.op_type == "Identity" else None)
    prune_unused_initializers(graph)


def fold_batchnorm(graph: onnx.GraphProto) -> int:
    """Fold each BatchNormalization that directly follows a Conv into that Conv; returns how many.

    w' = w * gamma / sqrt(var + eps) per output channel, b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    A zero weight stays exactly zero, so the pruned pattern survives the fold.
    """
    tensors = initializers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded, drop = 0, set()
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or consumers.get(conv.output[0]) != 1
                or conv.input[1] not in tensors or not all(n in tensors for n in bn.input[1:5])):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (tensors[n].astype(np.float64) for n in bn.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        weight = tensors[conv.input[1]].astype(np.float64)
        bias = tensors[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        new_weight = (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        new_bias = ((bias - mean) * scale + beta).astype(np.float32)
        weight_name, bias_name = conv.input[1] + "_bnfold", bn.output[0] + "_bias"
        graph.initializer.extend([numpy_helper.from_array(new_weight, weight_name),
                                  numpy_helper.from_array(new_bias, bias_name)])
        del conv.input[1:]
        conv.input.extend([weight_name, bias_name])
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded += 1
    if folded:
        keep = [node for node in graph.node if id(node) not in drop]
        del graph.node[:]
        graph.node.extend(keep)
        prune_unused_initializers(graph)
    return folded


def prune_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers no node reads (left behind by folding)."""
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def layer_name(node_name: str, fallback: str) -> str:
    """``/blocks/blocks.0/conv1/Conv`` → ``blocks.0.conv1``: the PyTorch module path of a node.

    TorchScript scopes repeat a parent's name in a Sequential child's (``blocks`` then ``blocks.0``),
    so a part that extends the previous one replaces it.
    """
    parts: List[str] = []
    for part in node_name.strip("/").split("/")[:-1]:
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part
        elif part:
            parts.append(part)
    return ".".join(parts) or fallback


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def rename_tensors(graph: onnx.GraphProto) -> None:
    """Give initializers readable, file-name-safe names: ``LAYER.weight`` / ``LAYER.bias`` for layers."""
    init_names = {t.name for t in graph.initializer}
    mapping: Dict[str, str] = {}
    taken = set()

    def claim(old: str, wanted: str) -> None:
        if old in mapping:
            return
        candidate, i = wanted, 1
        while candidate in taken:
            candidate, i = f"{wanted}_{i}", i + 1
        mapping[old] = candidate
        taken.add(candidate)

    for index, node in enumerate(graph.node):
        if node.op_type in RNN_OPS:  # one node per layer of the module: /rnn/GRU, /rnn/GRU_1
            layer = _safe(layer_name(node.name, "rnn")) + "." + _safe(node.name.rsplit("/", 1)[-1].lower())
            for role, name in zip(("ih.weight", "hh.weight", "bias"), node.input[1:4]):
                if name in init_names:
                    claim(name, f"{layer}.{role}")
        elif node.op_type == "Gather" and node.input[0] in init_names and _is_float_matrix(graph, node.input[0]):
            claim(node.input[0], f"{_safe(layer_name(node.name, f'gather{index}'))}.weight")  # an Embedding
        if node.op_type in WEIGHT_OPS:
            layer = _safe(layer_name(node.name, f"{node.op_type.lower()}{index}"))
            roles = ("input", "weight", "bias")
            for role, name in zip(roles, node.input):
                if role != "input" and name in init_names:
                    claim(name, f"{layer}.{role}")
            if node.op_type == "MatMul" and node.input[0] in init_names:
                claim(node.input[0], f"{layer}.weight")
    for name in sorted(init_names - set(mapping)):
        claim(name, _safe(name) or "tensor")
    for tensor in graph.initializer:
        tensor.name = mapping[tensor.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]


def _is_float_matrix(graph: onnx.GraphProto, name: str) -> bool:
    tensor = next((t for t in graph.initializer if t.name == name), None)
    return tensor is not None and len(tensor.dims) >= 2 and tensor.data_type == onnx.TensorProto.FLOAT


def weight_inputs(graph: onnx.GraphProto) -> Dict[str, Tuple[str, str]]:
    """The prunable weights: initializer name → (layer name, op type) for Conv/Gemm/MatMul, an
    Embedding's Gather table and an RNN/GRU/LSTM's W and R."""
    init_names = {t.name for t in graph.initializer}
    found: Dict[str, Tuple[str, str]] = {}
    for node in graph.node:
        if node.op_type not in STORED_WEIGHT_OPS:
            continue
        candidates: Sequence[str] = node.input[1:2]
        if node.op_type == "MatMul" and node.input[1] not in init_names:
            candidates = node.input[0:1]
        elif node.op_type == "Gather":
            candidates = node.input[0:1]
        elif node.op_type in RNN_OPS:
            candidates = node.input[1:3]
        for name in candidates:
            if name in init_names and name.endswith(".weight"):
                found[name] = (name[: -len(".weight")], node.op_type)
    return found


def _attribute_value(attribute: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        array = numpy_helper.to_array(value)
        return {"tensor": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    if isinstance(value, (onnx.GraphProto, onnx.SparseTensorProto)):
        raise ExportError(f"attribute {attribute.name!r} holds a subgraph/sparse tensor; not exportable")
    return value


def node_list(graph: onnx.GraphProto) -> List[Dict[str, Any]]:
    """The graph as plain JSON: what the runtime executes, in topological order."""
    return [{"op_type": node.op_type, "name": node.name, "inputs": list(node.input),
             "outputs": list(node.output), "domain": node.domain,
             "attributes": {a.name: _attribute_value(a) for a in node.attribute}}
            for node in graph.node]
