"""`edge-runtime to-onnx`: one plain, self-contained ONNX file from a MODEL_DIR (standard library + numpy).

A MODEL_DIR's ONNX files leave their weights elsewhere: format 3 holds placeholders the runtime feeds
at load, formats 1-2 point at bytes inside weights.npz. Stock onnxruntime, Netron or another tool want
one file, so this rewrites the protobuf at the wire level — every field copied as it is, except each
placeholder or external initializer, which is re-encoded with its values as ``raw_data``. No ``onnx``
package is needed (the device has none), and the graph is exactly the one the MODEL_DIR was checked
against. A protobuf message cannot exceed 2 GiB, so a larger model stays a MODEL_DIR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np

from edge_runtime.errors import ModelDirError
from edge_runtime.onnx_wire import _fields, parse_tensor

PROTOBUF_LIMIT = (2 << 30) - 1
ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7,
              "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13}
MODEL_GRAPH, GRAPH_INITIALIZER, GRAPH_SPARSE, SPARSE_VALUES = 7, 5, 15, 1

Lookup = Callable[[str], Optional[np.ndarray]]  # an initializer's name → its values (None: keep as is)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, value: object) -> bytes:
    """One field re-encoded from what onnx_wire._fields yields (an int for a varint, else bytes)."""
    key = _varint((number << 3) | wire)
    if wire == 0:
        return key + _varint(int(value))
    if wire == 2:
        return key + _varint(len(value)) + bytes(value)
    return key + bytes(value)


def _tensor(name: str, array: np.ndarray) -> bytes:
    """A TensorProto holding ``array`` as little-endian raw_data."""
    if array.dtype.name not in ONNX_TYPES:
        raise ModelDirError(f"tensor {name!r}: dtype {array.dtype} has no ONNX type here")
    encoded = b"".join(_field(1, 0, int(d)) for d in array.shape)
    encoded += _field(2, 0, ONNX_TYPES[array.dtype.name])
    encoded += _field(8, 2, name.encode("utf-8"))
    return encoded + _field(9, 2, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())


def _rewrite(buf: memoryview, edit: Dict[int, Callable[[memoryview], bytes]]) -> Iterator[bytes]:
    """The message's fields, those numbered in ``edit`` (length-delimited) replaced by what it returns."""
    for number, wire, value in _fields(buf):
        yield _field(number, wire, edit[number](value) if number in edit and wire == 2 else value)


def _initializer(lookup: Lookup) -> Callable[[memoryview], bytes]:
    def replace(value: memoryview) -> bytes:
        name = parse_tensor(value).name
        array = lookup(name)
        return bytes(value) if array is None else _tensor(name, array)
    return replace


def embed(onnx_bytes: bytes, lookup: Lookup) -> bytes:
    """``onnx_bytes`` with every initializer (and sparse initializer's values) for which ``lookup``
    gives an array rewritten to hold it inline; everything else unchanged."""
    initializer = _initializer(lookup)
    sparse = lambda value: b"".join(_rewrite(value, {SPARSE_VALUES: initializer}))
    graph = lambda value: b"".join(_rewrite(value, {GRAPH_INITIALIZER: initializer, GRAPH_SPARSE: sparse}))
    chunks: List[bytes] = []
    total = 0
    for chunk in _rewrite(memoryview(onnx_bytes), {MODEL_GRAPH: graph}):
        total += len(chunk)
        if total > PROTOBUF_LIMIT:
            raise ModelDirError("the model is over 2 GiB, more than one ONNX file can hold; keep the MODEL_DIR")
        chunks.append(chunk)
    return b"".join(chunks)


def model_dir_to_onnx(model_dir: Path, variant: str = "fp32") -> bytes:
    """The plain ONNX bytes of a MODEL_DIR's fp32 model (or its ``int8`` variant), after the same
    checks a session makes: manifest schema, sha256 of every file, model.onnx against the manifest."""
    from edge_runtime import variants
    from edge_runtime.model_dir import Weights, read_manifest, verify_files
    from edge_runtime.model_format import FORMAT_VERSION_COMPACT, ONNX_FILE, inside, open_regular
    from edge_runtime.onnx_check import check_model, check_variant

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    verify_files(model_dir, manifest)
    weights = Weights(model_dir, manifest)
    try:
        model = check_model(model_dir, manifest, weights)
        if variant == "fp32":
            name = ONNX_FILE
            if manifest["format_version"] >= FORMAT_VERSION_COMPACT:
                fed = weights.fed()
                lookup: Lookup = fed.get
            else:
                lookup = _external_lookup(model, weights)
        else:
            engine = next((e for e, v in variants.ENGINES.items() if v == variant), None)
            if engine is None:
                raise ModelDirError(f"unknown variant {variant!r} (fp32 or {', '.join(variants.ENGINES.values())})")
            entry = variants.require(model_dir, manifest, engine)
            feeds = check_variant(model_dir, manifest, entry, weights)
            name = entry["file"]
            arrays = {key: (weights.quantized(feed["tensor"]).T if feed.get("transpose")
                            else weights.quantized(feed["tensor"])) for key, feed in feeds.items()}
            lookup = arrays.get
        with open_regular(inside(model_dir, name)) as handle:
            data = handle.read()
        return embed(data, lookup)
    finally:
        weights.close()


def _external_lookup(model: Any, weights: Any) -> Lookup:
    """Formats 1-2: an external tensor's values are the npz member at its offset (check_model has
    proved each points at exactly its own member)."""
    by_offset = {member.offset: key for key, member in weights.archive.members.items()}
    tensors = [*model.initializers, *(sparse.values for sparse in model.sparse_initializers)]
    table = {t.name: weights.archive.read(by_offset[int(t.external["offset"])]) for t in tensors if t.is_external}
    return table.get
