"""model.onnx checked against manifest.json and weights.npz before any engine reads it.

A MODEL_DIR has two engines, the native kernels (manifest graph + weights.npz) and onnxruntime
(model.onnx, whose weights are external data inside weights.npz). Every file hash can be valid and the
two still compute different functions, or onnxruntime can be pointed at ``/etc/passwd``: onnxruntime
1.19 (the Pi's) follows any external-data location, ``..`` and symlinks included. So at load:

- the graph decoded from model.onnx must be the manifest's graph, node for node (plus the Cast nodes
  export adds for float16 weights);
- every initializer must be a tensor the manifest lists. One the manifest calls external (every
  weight, every float tensor over ``INLINE_BYTES``; every tensor of format 1 without an ``onnx`` key)
  must be external data in ``weights.npz`` (the only location allowed; the npz itself is opened only
  as a regular file, never a symlink) at exactly the offset and length of that tensor's own npz
  member, with the member's dtype and shape. One it calls inline (a small constant: shapes, axes,
  indices, which onnxruntime's shape inference must read from the file itself) must hold inline
  data bit for bit equal to the copy the npz keeps, which is what the native engine computes with;
- a sparse initializer's inline int64 indices must be the CSR arrays' non-zeros, linearised.

Format 3 (compact) holds no weights in model.onnx at all: a tensor the manifest calls ``fed`` must be
a *placeholder* (float32, the manifest's shape, external data naming only ``weights.npz`` and no bytes)
that the runtime fills from weights.npz at load, and there are no sparse initializers. A variant file
(model.int8.onnx) may have placeholders only for the feeds its manifest entry declares (see
:func:`check_variant`); any other external data is refused, since onnxruntime would follow it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from edge_runtime.errors import ModelDirError
from edge_runtime.model_dir import FolderFiles, Weights
from edge_runtime.model_format import (FED_LOCATION, FORMAT_VERSION_COMPACT, ONNX_FILE, WEIGHTS_FILE, max_model_bytes,
                                       open_regular)
from edge_runtime.npz_reader import Member
from edge_runtime import onnx_wire
from edge_runtime.onnx_wire import DATA_TYPES, Attribute, Model, Node, Tensor

EXTERNAL_KEYS = {"location", "offset", "length"}
FLOAT, INT8 = 1, 3  # TensorProto.data_type
MAX_ATTRIBUTE_VALUES = 1 << 16


def read_model(model_dir: Path, name: str = ONNX_FILE, files: Optional[FolderFiles] = None) -> Model:
    """Decode model.onnx (or another ONNX file the manifest lists: a regular file inside MODEL_DIR, of
    bounded size); with ``files``, the bytes this load already read and hashed."""
    if files is not None:
        return onnx_wire.parse_model(files.read(name))
    path = Path(model_dir) / name
    with open_regular(path) as handle:
        data = handle.read(max_model_bytes() + 1)
    if len(data) > max_model_bytes():
        raise ModelDirError(f"{path}: larger than {max_model_bytes():,} bytes (EDGEPRUNE_MAX_MODEL_BYTES)")
    return onnx_wire.parse_model(data, str(path))


def check_model(model_dir: Path, manifest: Mapping[str, Any], weights: Weights) -> Model:
    """Refuse a model.onnx that reads outside its tensors' bytes or differs from the manifest's graph."""
    model = read_model(model_dir, files=weights.files)
    where = f"{Path(model_dir) / ONNX_FILE}"
    _check_initializers(model, manifest, weights, where)
    _check_graph(model, manifest, where)
    check_window_attributes(manifest, where)
    return model


WINDOW_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")
MAX_WINDOW = 1 << 12  # kernel, stride, dilation and padding sizes: far beyond any real layer
MAX_GROUPS = 1 << 16  # conv groups: a depthwise conv has one per channel


def check_window_attributes(manifest: Mapping[str, Any], where: str) -> None:
    """Refuse window sizes and conv groups no real layer has, before any engine loops over them.

    Found by the fuzz test: ``group = 879381798`` made the native loader build one kernel per group
    (hours, then out of memory); huge strides/pads/kernels make allocations no device can hold.
    """
    for index, node in enumerate(manifest["graph"]):
        if node["op_type"] not in WINDOW_OPS:
            continue
        attrs = node["attributes"]
        for name, low in (("kernel_shape", 1), ("strides", 1), ("dilations", 1), ("pads", 0)):
            values = attrs.get(name, [])
            if not isinstance(values, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_WINDOW for v in values):
                raise ModelDirError(f"{where}: node {index} ({node['op_type']}) has {name} {values!r} "
                                    f"outside [{low}, {MAX_WINDOW}]")
        if node["op_type"] in ("Conv", "ConvTranspose"):
            _check_group(node, manifest, index, where)


def _check_group(node: Mapping[str, Any], manifest: Mapping[str, Any], index: int, where: str) -> None:
    """``group`` must split the weight's first axis (a Conv's output channels, a ConvTranspose's input
    channels) and, where the graph declares it, the input's channels.

    A weight computed in the graph (DequantizeLinear in every QDQ model onnxruntime.quantization writes)
    has no shape here: only the range and the declared input channels are checked, and the op checks
    the rest against the arrays it is given at run time (``conv.check_groups``)."""
    group = node["attributes"].get("group", 1)
    op = node["op_type"]
    if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= MAX_GROUPS:
        raise ModelDirError(f"{where}: node {index} ({op}) has group {group!r} outside [1, {MAX_GROUPS}]")
    weight = manifest["tensors"].get(node["inputs"][1]) if len(node["inputs"]) > 1 else None
    shape = weight.get("shape") if isinstance(weight, Mapping) else None
    if shape:
        which = "input" if op == "ConvTranspose" else "output"
        if not group <= shape[0] or shape[0] % group:
            raise ModelDirError(f"{where}: node {index} ({op}) has group {group}, which does not divide its "
                                f"{shape[0]} {which} channels")
    channels = _declared_channels(manifest, node["inputs"][0] if node["inputs"] else "")
    if channels is not None and channels % group:
        raise ModelDirError(f"{where}: node {index} ({op}) has group {group}, which does not divide its "
                            f"{channels} input channels")


def _declared_channels(manifest: Mapping[str, Any], name: str) -> Optional[int]:
    """Axis 1 of graph input ``name`` when its declared shape fixes it, else None."""
    for spec in manifest.get("inputs") or []:
        shape = spec.get("shape") if isinstance(spec, Mapping) and spec.get("name") == name else None
        if isinstance(shape, list) and len(shape) > 1 and isinstance(shape[1], int) and shape[1] > 0:
            return shape[1]
    return None


# -- the graph ---------------------------------------------------------------------------------------
def _tensor_array(tensor: Tensor, where: str, what: str = "attribute tensor",
                  max_values: int = MAX_ATTRIBUTE_VALUES) -> np.ndarray:
    """An inline tensor's values (attribute tensors and inline initializers may not be external)."""
    if tensor.is_external:
        raise ModelDirError(f"{where}: {what} uses external data where the MODEL_DIR keeps it inline")
    if tensor.data_type not in DATA_TYPES:
        raise ModelDirError(f"{where}: {what} of ONNX data type {tensor.data_type}")
    dtype_name, typed_field = DATA_TYPES[tensor.data_type]
    dtype = np.dtype(dtype_name)
    if any(d < 0 for d in tensor.dims):
        raise ModelDirError(f"{where}: {what} of shape {tensor.dims} refused")
    count = int(np.prod(tensor.dims, dtype=object)) if tensor.dims else 1
    if count > max_values:
        raise ModelDirError(f"{where}: {what} of shape {tensor.dims} refused")
    if tensor.raw_data is not None:
        if len(tensor.raw_data) != count * dtype.itemsize:
            raise ModelDirError(f"{where}: {what} raw data does not match its shape")
        return np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<")).reshape(tensor.dims)
    values = tensor.typed.get(typed_field, [])
    if len(values) != count:
        raise ModelDirError(f"{where}: {what} data does not match its shape")
    try:
        if dtype_name == "float16":  # stored as the bits of each half float in int32_data
            return np.asarray(values, dtype=np.uint16).view(np.float16).reshape(tensor.dims)
        return np.asarray(values, dtype=dtype).reshape(tensor.dims)
    except OverflowError:
        raise ModelDirError(f"{where}: {what} value out of range for {dtype_name}") from None


def _attribute_value(attribute: Attribute, where: str) -> Any:
    """The attribute as export's manifest writes it (onnx.helper.get_attribute_value, JSON-ready)."""
    kind = attribute.type
    if kind == onnx_wire.FLOAT:
        return attribute.f
    if kind == onnx_wire.INT:
        return attribute.i
    if kind == onnx_wire.STRING:
        return attribute.s.decode("utf-8", errors="replace")
    if kind == onnx_wire.FLOATS:
        return list(attribute.floats)
    if kind == onnx_wire.INTS:
        return list(attribute.ints)
    if kind == onnx_wire.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in attribute.strings]
    array = _tensor_array(attribute.t or Tensor(), where)
    return {"tensor": array.tolist(), "dtype": str(array.dtype), "shape": list(array.shape)}


def _same(mine: Any, theirs: Any) -> bool:
    """Whether two JSON-ready values are equal as JSON spells them: the same types (1 is not 1.0 nor
    True), floats equal with their sign (-0.0 is not 0.0) and every NaN equal to every NaN."""
    if type(mine) is not type(theirs):
        return False
    if type(mine) is float:
        return (mine == theirs and math.copysign(1.0, mine) == math.copysign(1.0, theirs)) or (
            mine != mine and theirs != theirs)
    if type(mine) is list:
        return len(mine) == len(theirs) and all(map(_same, mine, theirs))
    if type(mine) is dict:
        return mine.keys() == theirs.keys() and all(_same(value, theirs[key]) for key, value in mine.items())
    return mine == theirs


def _same_node(node: Node, theirs: Any, where: str) -> bool:
    """The decoded ``node`` is the manifest's node ``theirs``: op, name, domain, inputs, outputs and
    every attribute (as the manifest writes it), compared field by field without re-encoding either."""
    if not isinstance(theirs, Mapping) or (node.op_type, node.name, node.domain) != (
            theirs.get("op_type"), theirs.get("name", ""), theirs.get("domain", "")):
        return False
    if not _same(node.inputs, theirs.get("inputs")) or not _same(node.outputs, theirs.get("outputs")):
        return False
    attributes = theirs.get("attributes")
    if type(attributes) is not dict or len(attributes) != len(node.attributes):
        return False
    # a name given twice in model.onnx collapses to one manifest entry: counted apart, so never equal
    return all(a.name in attributes and _same(_attribute_value(a, where), attributes[a.name])
               for a in node.attributes) and len({a.name for a in node.attributes}) == len(attributes)


def _fp16_casts(manifest: Mapping[str, Any]) -> Dict[str, str]:
    """output → input of the Cast nodes export puts first for each float16 tensor (formats 1-2; format 3
    feeds float32 built from the float16 values instead)."""
    if manifest["format_version"] >= FORMAT_VERSION_COMPACT:
        return {}
    return {name: f"{name}__fp16" for name, info in manifest["tensors"].items() if info["dtype"] == "float16"}


def _check_graph(model: Model, manifest: Mapping[str, Any], where: str) -> None:
    casts = _fp16_casts(manifest)
    nodes = list(model.nodes)
    leading = nodes[:len(casts)]
    if sorted((n.op_type, tuple(n.inputs), tuple(n.outputs)) for n in leading) != sorted(
            ("Cast", (source,), (name,)) for name, source in casts.items()):
        raise ModelDirError(f"{where}: its float16 Cast nodes do not match the manifest's float16 tensors")
    derived = nodes[len(casts):]
    if len(derived) != len(manifest["graph"]):
        raise ModelDirError(f"{where}: has {len(derived)} nodes, the manifest's graph {len(manifest['graph'])}")
    for index, (mine, theirs) in enumerate(zip(derived, manifest["graph"])):
        if not _same_node(mine, theirs, where):
            raise ModelDirError(f"{where}: node {index} ({mine.op_type}) differs from the manifest's graph")
    stored = {t.name for t in model.initializers} | {s.values.name for s in model.sparse_initializers}
    inputs = [name for name in model.inputs if name not in stored]
    expected = [spec["name"] for spec in manifest.get("inputs") or [manifest["input"]]]
    if inputs != expected or model.outputs != list(manifest["outputs"]):
        raise ModelDirError(f"{where}: its inputs/outputs differ from the manifest's")


# -- the weights -------------------------------------------------------------------------------------
def _check_external(tensor: Tensor, member: Optional[Member], key: str, where: str) -> None:
    """``tensor`` must be external data at exactly the bytes of npz member ``key``."""
    name = tensor.name
    if member is None:
        raise ModelDirError(f"{where}: initializer {name!r} has no npz member {key!r}")
    if not tensor.is_external or tensor.has_inline_data or tensor.data_location != onnx_wire.EXTERNAL:
        raise ModelDirError(f"{where}: initializer {name!r} must be external data in {WEIGHTS_FILE}")
    if set(tensor.external) != EXTERNAL_KEYS:
        raise ModelDirError(f"{where}: initializer {name!r} has external_data keys {sorted(tensor.external)}")
    if tensor.external["location"] != WEIGHTS_FILE:
        raise ModelDirError(f"{where}: initializer {name!r} reads {tensor.external['location']!r}; "
                            f"only {WEIGHTS_FILE} is allowed")
    if (tensor.external["offset"], tensor.external["length"]) != (str(member.offset), str(member.nbytes)):
        raise ModelDirError(f"{where}: initializer {name!r} points at bytes other than npz member {key!r}")
    if DATA_TYPES.get(tensor.data_type, ("?",))[0] != member.dtype.name or tuple(tensor.dims) != member.shape:
        raise ModelDirError(f"{where}: initializer {name!r} type or shape differs from npz member {key!r}")


def _check_inline(tensor: Tensor, member: Optional[Member], weights: Weights, key: str, where: str) -> None:
    """``tensor`` must be inline data equal, bit for bit, to npz member ``key`` (the native engine's copy)."""
    name = tensor.name
    if member is None:
        raise ModelDirError(f"{where}: initializer {name!r} has no npz member {key!r}")
    if tensor.is_external or tensor.data_location == onnx_wire.EXTERNAL:
        raise ModelDirError(f"{where}: initializer {name!r} must be inline in model.onnx, as the manifest says")
    if DATA_TYPES.get(tensor.data_type, ("?",))[0] != member.dtype.name or tuple(tensor.dims) != member.shape:
        raise ModelDirError(f"{where}: initializer {name!r} type or shape differs from npz member {key!r}")
    if tensor.raw_data is not None and len(tensor.raw_data) == member.nbytes:
        # raw_data and npz members are both little-endian, of the same dtype and shape: compare the bytes
        if tensor.raw_data != weights.archive.raw(key):
            raise ModelDirError(f"{where}: inline initializer {name!r} differs from npz member {key!r}")
        return
    inline = _tensor_array(tensor, where, f"initializer {name!r}", max_model_bytes())
    stored = weights.archive.read(key)
    little = stored.dtype.newbyteorder("<")
    if np.ascontiguousarray(inline, dtype=little).tobytes() != np.ascontiguousarray(stored, dtype=little).tobytes():
        raise ModelDirError(f"{where}: inline initializer {name!r} differs from npz member {key!r}")


def _coo_indices(tensor: Tensor, where: str) -> np.ndarray:
    if tensor.is_external or tensor.data_type != 7 or len(tensor.dims) != 1:
        raise ModelDirError(f"{where}: sparse indices {tensor.name!r} must be inline 1-D int64")
    if tensor.raw_data is not None:
        if len(tensor.raw_data) != 8 * tensor.dims[0]:
            raise ModelDirError(f"{where}: sparse indices {tensor.name!r} do not match their shape")
        return np.frombuffer(tensor.raw_data, dtype="<i8")
    return np.asarray(tensor.typed.get(7, []), dtype=np.int64)


def _check_sparse_indices(coo: np.ndarray, weights: Weights, name: str, where: str) -> None:
    """The linearised indices onnxruntime uses must be exactly the CSR arrays' non-zeros."""
    _, indices, indptr = weights.csr_arrays(name)
    cols = weights.matrix_shape(name)[1]
    rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    if coo.shape != indices.shape or not np.array_equal(coo, rows * cols + indices):
        raise ModelDirError(f"{where}: sparse indices of {name!r} differ from its CSR arrays in {WEIGHTS_FILE}")


def _check_placeholder(tensor: Tensor, shape: List[int], data_type: int, where: str) -> None:
    """A format-3 placeholder: no bytes of its own, external data naming only FED_LOCATION (a file that
    never exists: onnxruntime, were it ever left unfed, reads nothing), the declared type and shape."""
    name = tensor.name
    if tensor.has_inline_data or tensor.data_location != onnx_wire.EXTERNAL:
        raise ModelDirError(f"{where}: initializer {name!r} must be a placeholder the runtime feeds")
    if tensor.external != {"location": FED_LOCATION}:
        raise ModelDirError(f"{where}: placeholder {name!r} has external_data {sorted(tensor.external.items())}")
    if tensor.data_type != data_type or list(tensor.dims) != list(shape):
        raise ModelDirError(f"{where}: placeholder {name!r} type or shape differs from its tensor")


def _check_compact(model: Model, manifest: Mapping[str, Any], weights: Weights, where: str) -> None:
    """Format 3: fed tensors are placeholders, inline ones equal their npz copy, nothing sparse, and
    every stored array valid."""
    tensors = manifest["tensors"]
    weights.check_all()
    if model.sparse_initializers:
        raise ModelDirError(f"{where}: format 3 keeps no sparse initializer in model.onnx")
    seen = []
    for tensor in model.initializers:
        info = tensors.get(tensor.name)
        if info is None:
            raise ModelDirError(f"{where}: initializer {tensor.name!r} is not a tensor of the manifest")
        if info.get("onnx") == "fed":
            _check_placeholder(tensor, info["shape"], FLOAT, where)
        else:
            _check_inline(tensor, weights.archive.members.get(tensor.name), weights, tensor.name, where)
        seen.append(tensor.name)
    if sorted(seen) != sorted(tensors):
        raise ModelDirError(f"{where}: its initializers are not exactly the manifest's tensors")


def check_variant(model_dir: Path, manifest: Mapping[str, Any], entry: Mapping[str, Any],
                  weights: Optional[Weights] = None) -> Dict[str, Any]:
    """A variant file (model.int8.onnx) before onnxruntime reads it: its placeholders are exactly the
    feeds its manifest entry declares, each an int8 tensor of the manifest the right shape; no other
    initializer is external; with ``weights``, each feed's scale in the file (``scale``: its inline
    initializer) equals the scale the fp32 engines dequantize with, so both compute from one set of
    numbers. Returns the feeds ``{initializer: {"tensor", "transpose", "scale"}}``."""
    where = f"{Path(model_dir) / entry['file']}"
    model = read_model(model_dir, entry["file"], weights.files if weights is not None else None)
    feeds = entry.get("feeds") or {}
    tensors = manifest["tensors"]
    if not isinstance(feeds, dict) or not all(
            isinstance(feed, dict) and feed.get("tensor") in tensors and tensors[feed["tensor"]].get("dtype") == "int8"
            and "scale" in tensors[feed["tensor"]] and isinstance(feed.get("transpose", False), bool)
            and len(tensors[feed["tensor"]]["shape"]) == (2 if feed.get("transpose") else len(tensors[feed["tensor"]]["shape"]))
            for feed in feeds.values()):
        raise ModelDirError(f"{where}: malformed feeds in the manifest's variant entry")
    if any(sparse.values.is_external or sparse.indices.is_external for sparse in model.sparse_initializers):
        raise ModelDirError(f"{where}: a sparse initializer reads external data")
    placed = set()
    for tensor in model.initializers:
        feed = feeds.get(tensor.name)
        if feed is None:
            if tensor.is_external or tensor.data_location == onnx_wire.EXTERNAL:
                raise ModelDirError(f"{where}: initializer {tensor.name!r} reads external data")
            continue
        shape = list(tensors[feed["tensor"]]["shape"])
        _check_placeholder(tensor, shape[::-1] if feed.get("transpose") else shape, INT8, where)
        placed.add(tensor.name)
    if placed != set(feeds):
        raise ModelDirError(f"{where}: feeds {sorted(set(feeds) - placed)} have no placeholder")
    if weights is not None:
        inline = {t.name: t for t in model.initializers if t.name not in feeds}
        for name, feed in feeds.items():
            scale = inline.get(feed.get("scale"))
            if scale is None or scale.data_type != FLOAT:
                raise ModelDirError(f"{where}: feed {name!r} names no float32 scale initializer")
            ours = weights.scale(feed["tensor"]).reshape(-1)
            theirs = _tensor_array(scale, where, f"scale {scale.name!r}", max_model_bytes()).reshape(-1)
            if theirs.shape != ours.shape or theirs.astype("<f4").tobytes() != ours.astype("<f4").tobytes():
                raise ModelDirError(f"{where}: the scale of {feed['tensor']!r} differs from {WEIGHTS_FILE}'s")
    return dict(feeds)


def _check_initializers(model: Model, manifest: Mapping[str, Any], weights: Weights, where: str) -> None:
    if manifest["format_version"] >= FORMAT_VERSION_COMPACT:
        _check_compact(model, manifest, weights, where)
        return
    members = weights.archive.members
    tensors = manifest["tensors"]
    stored_as = {(f"{n}__fp16" if info["dtype"] == "float16" else n): n for n, info in tensors.items()}
    seen: List[str] = []
    for tensor in model.initializers:
        name = stored_as.get(tensor.name)
        if name is None or tensors[name]["storage"] != "dense":
            raise ModelDirError(f"{where}: initializer {tensor.name!r} is not a dense tensor of the manifest")
        if tensors[name].get("onnx", "external") == "inline":
            _check_inline(tensor, members.get(name), weights, name, where)
        else:
            _check_external(tensor, members.get(name), name, where)
        seen.append(name)
    for sparse in model.sparse_initializers:
        name = stored_as.get(sparse.values.name)
        if name is None or tensors[name]["storage"] != "csr":
            raise ModelDirError(f"{where}: sparse initializer {sparse.values.name!r} is not a CSR tensor "
                                "of the manifest")
        if list(sparse.dims) != list(tensors[name]["shape"]):
            raise ModelDirError(f"{where}: sparse initializer {name!r} has dims {sparse.dims}")
        _check_external(sparse.values, members.get(f"{name}.data"), f"{name}.data", where)
        _check_sparse_indices(_coo_indices(sparse.indices, where), weights, name, where)
        seen.append(name)
    if sorted(seen) != sorted(tensors):
        raise ModelDirError(f"{where}: its initializers are not exactly the manifest's tensors")
