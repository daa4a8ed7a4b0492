"""A plain ``.onnx`` file as what ``InferenceSession`` needs: a manifest-like dict and in-memory weights.

    manifest, weights = load_onnx_file(Path("model.onnx"))

The file is untrusted input like a MODEL_DIR: it is opened only as a regular file (never a symlink,
FIFO or device), read up to ``max_model_bytes()`` and decoded by the strict stdlib reader in
``onnx_wire`` (no ``onnx`` import); model bytes (as onnxruntime also takes) are decoded the same way.
Initializers become numpy arrays from ``raw_data`` or the typed fields; sparse initializers are
expanded from their COO indices. External data (``model.onnx.data``, which torch's default exporter
writes) is read by ``external_data.ExternalFiles`` from a regular file beside the model only, and the
arrays are what onnxruntime gets for those initializers (``FileWeights.fed``): onnxruntime never opens
a file the model names, and it loads the bytes that were checked, not the path again.

The float weight of a Conv/Gemm/MatMul whose density is below :data:`CSR_DENSITY` is handed out as CSR
(the rule export uses); every other tensor stays dense. The dict has the keys the session and
``graph.compile_graph`` read: ``graph``, ``inputs``, ``outputs``, ``output_specs``, ``opset``,
``tensors``, plus ``source: "onnx"`` and ``layers`` (for ``edge-runtime info``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from edge_runtime.errors import ModelDirError
from edge_runtime.external_data import ExternalFiles
from edge_runtime.graph import WEIGHT_OPS, ArrayWeights, is_weight_node
from edge_runtime.model_format import max_model_bytes, open_regular
from edge_runtime.onnx_check import _attribute_value, _tensor_array, check_window_attributes
from edge_runtime.onnx_wire import DATA_TYPES, Model, SparseTensor, parse_model

CSR_DENSITY = 0.28  # below this share of non-zeros a weight is kept as CSR (export's rule)


def is_onnx_file(path: Any) -> bool:
    """Whether ``path`` names a file (a plain .onnx) rather than a MODEL_DIR folder."""
    path = Path(path)
    return path.suffix.lower() == ".onnx" or (path.exists() and not path.is_dir())


class FileWeights(ArrayWeights):
    """``ArrayWeights`` of a plain file, which records no sample input (the session then tunes on
    seeded inputs of the declared shapes). ``source`` is the file's bytes (what onnxruntime loads);
    ``external`` names the initializers read from external data."""

    def __init__(self, arrays: Dict[str, np.ndarray], sparse: Sequence[str], source: bytes,
                 external: Sequence[str] = ()) -> None:
        super().__init__(arrays, sparse)
        self.source: Optional[bytes] = source
        self.external = list(external)

    def fed(self) -> Dict[str, np.ndarray]:
        """The external initializers' arrays, for onnxruntime's ``add_external_initializers``."""
        return {name: self.arrays[name] for name in self.external}

    def sample_inputs(self, manifest: Any) -> Dict[str, np.ndarray]:
        raise ModelDirError("a plain ONNX file records no sample input")

    def close(self) -> None:
        """Drop the arrays once the engine is built: an onnxruntime session holds its own copy, and the
        native program keeps only what it computes with."""
        self.arrays = {}
        self.source = None


def read_onnx_file(path: Path) -> bytes:
    """The bytes of ``path``, a regular file of bounded size (ModelDirError in one line otherwise)."""
    with open_regular(path) as handle:
        data = handle.read(max_model_bytes() + 1)
    if len(data) > max_model_bytes():
        raise ModelDirError(f"{path}: larger than {max_model_bytes():,} bytes (EDGEPRUNE_MAX_MODEL_BYTES)")
    return data


def decode(data: bytes, where: str) -> Model:
    """``data`` decoded; ModelDirError in one line when it is not ONNX this runtime reads."""
    model = parse_model(data, where, "a plain ONNX file")
    if not model.nodes and not model.outputs:
        raise ModelDirError(f"{where}: not an ONNX model (no graph nodes or outputs)")
    return model


def _sparse_array(sparse: SparseTensor, where: str, limit: int) -> np.ndarray:
    """A SparseTensorProto expanded to dense: values at linear ([nnz]) or coordinate ([nnz, rank]) indices."""
    values = _tensor_array(sparse.values, where, "sparse initializer values", limit)
    indices = _tensor_array(sparse.indices, where, "sparse initializer indices", 2 * limit).astype(np.int64)
    dims = [int(d) for d in sparse.dims]
    count = int(np.prod(dims, dtype=object)) if dims else 1
    if any(d < 0 for d in dims) or count > limit:
        raise ModelDirError(f"{where}: sparse initializer of shape {dims} refused")
    if indices.ndim == 2 and dims:
        if indices.shape[1] != len(dims) or (indices.size and ((indices < 0) | (indices >= dims)).any()):
            raise ModelDirError(f"{where}: sparse initializer indices outside its shape {dims}")
        indices = np.ravel_multi_index(indices.T, dims) if indices.size else indices.reshape(-1)
    outside = bool(indices.size) and (indices.min() < 0 or indices.max() >= count)
    if indices.ndim != 1 or len(indices) != values.size or outside:
        raise ModelDirError(f"{where}: sparse initializer indices do not match its values and shape {dims}")
    dense = np.zeros(count, dtype=values.dtype)
    dense[indices] = values.reshape(-1)
    return dense.reshape(dims)


def _initializers(model: Model, where: str, files: ExternalFiles) -> Dict[str, np.ndarray]:
    """Every initializer as a numpy array (external data through ``files``); their total bounded."""
    arrays: Dict[str, np.ndarray] = {}
    budget = max_model_bytes()
    for tensor in model.initializers:
        if tensor.is_external:
            array = files.read(tensor, budget)
        else:
            array = _tensor_array(tensor, where, f"initializer {tensor.name!r}", max(budget, 1))
        arrays[tensor.name] = array
        budget -= array.nbytes
        if budget < 0:
            raise ModelDirError(f"{where}: its weights take more than {max_model_bytes():,} bytes "
                                "(EDGEPRUNE_MAX_MODEL_BYTES)")
    for sparse in model.sparse_initializers:
        array = _sparse_array(sparse, where, max(budget, 1))
        arrays[sparse.values.name] = array
        budget -= array.nbytes
        if budget < 0:
            raise ModelDirError(f"{where}: its weights take more than {max_model_bytes():,} bytes")
    return arrays


def _spec(model: Model, name: str, where: str) -> Dict[str, Any]:
    """An input/output as the manifest writes it: name, shape (a string for each free axis), numpy dtype."""
    elem, dims = model.value_types.get(name, (0, None))
    if elem not in DATA_TYPES:
        raise ModelDirError(f"{where}: {name!r} has ONNX element type {elem}, which this runtime does not "
                            "run (tensors of numeric or bool types only)")
    return {"name": name, "shape": list(dims) if dims is not None else [], "dtype": DATA_TYPES[elem][0],
            "rank_known": dims is not None}


def _nodes(model: Model, where: str) -> List[Dict[str, Any]]:
    return [{"op_type": node.op_type, "name": node.name, "domain": node.domain, "inputs": list(node.inputs),
             "outputs": list(node.outputs),
             "attributes": {a.name: _attribute_value(a, where) for a in node.attributes}}
            for node in model.nodes]


def _sparse_weights(graph: List[Dict[str, Any]], weights: ArrayWeights) -> List[str]:
    """The Conv/Gemm/MatMul float weights with density below CSR_DENSITY."""
    names = []
    for node in graph:
        if node["op_type"] in WEIGHT_OPS and is_weight_node(node, weights):
            array = weights.arrays[node["inputs"][1]]
            if array.size and np.count_nonzero(array) / array.size < CSR_DENSITY:
                names.append(node["inputs"][1])
    return names


def load_onnx_file(source: Union[Path, bytes]) -> Tuple[Dict[str, Any], FileWeights]:
    """The manifest-like dict and weights of a plain ONNX file, or of its bytes (see the module
    docstring; bytes cannot name external data: there is no folder to read it from)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where, folder = bytes(source), "model bytes", None
    else:
        data, where, folder = read_onnx_file(Path(source)), str(source), Path(source).parent
    model = decode(data, where)
    files = ExternalFiles(folder, where)
    try:
        arrays = _initializers(model, where, files)
    finally:
        files.close()
    graph = _nodes(model, where)
    inputs = [_spec(model, name, where) for name in model.inputs if name not in arrays]
    outputs = [_spec(model, name, where) for name in model.outputs]
    if not outputs:
        raise ModelDirError(f"{where}: the graph has no outputs")
    dense = ArrayWeights(arrays)
    sparse = _sparse_weights(graph, dense)
    weights = FileWeights(arrays, sparse, data, [t.name for t in model.initializers if t.is_external])
    layers = []
    for node in graph:
        if node["op_type"] in WEIGHT_OPS and is_weight_node(node, weights):
            array = arrays[node["inputs"][1]]
            layers.append({"name": node["name"] or node["inputs"][1], "op": node["op_type"],
                           "weight": node["inputs"][1], "shape": list(array.shape),
                           "sparsity": 1.0 - float(np.count_nonzero(array)) / max(array.size, 1),
                           "storage": "csr" if node["inputs"][1] in sparse else "dense"})
    opset = model.opsets.get("", model.opsets.get("ai.onnx"))  # None: graph.py's default opset
    manifest = {"source": "onnx", "graph": graph, "inputs": inputs, "outputs": [s["name"] for s in outputs],
                "output_specs": outputs, "opset": opset or None,
                "tensors": weights.tensors, "layers": layers, "files": {},
                "meta": {**model.meta, "custom_metadata_map": dict(model.metadata_props)}}
    check_window_attributes(manifest, where)  # absurd groups/windows refused before any engine loops
    return manifest, weights
