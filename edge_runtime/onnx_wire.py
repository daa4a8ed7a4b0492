"""A small reader of ONNX ``ModelProto`` from protobuf wire format, standard library only.

The runtime may not import ``onnx``, yet it must know what model.onnx says before onnxruntime reads
it: which files its external data points at, which bytes, and which graph it computes. This module
decodes exactly those parts:

    ModelProto   ir_version, opset_import, graph
    GraphProto   node, initializer, sparse_initializer, input, output (names)
    NodeProto    input, output, name, op_type, domain, attribute
    Attribute    name, type, f, i, s, t, floats, ints, strings
    TensorProto  dims, data_type, name, raw_data, typed *_data fields, external_data, data_location

The file is untrusted, so the reader is strict: every length is checked against the bytes left,
varints are at most 10 bytes, repeated counts are bounded, and a field this reader does not know (a
subgraph, a function, training info, a sparse or graph attribute) is refused instead of skipped: it
could carry data or external references onnxruntime would follow. The message nesting is fixed by the
schema (model → graph → node → attribute → tensor), so there is no recursion to bound.

Wire format: each field is a varint key ``(number << 3) | wire_type``; wire types 0 varint, 1 fixed64,
2 length-delimited, 5 fixed32 (3/4, deprecated groups, are refused).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from edge_runtime.errors import ModelDirError

MAX_DIMS = 16
MAX_REPEATED = 1 << 20   # values in one packed attribute list or typed tensor field
MAX_NODES = 1 << 20

# AttributeProto.type
FLOAT, INT, STRING, TENSOR, GRAPH, FLOATS, INTS, STRINGS = 1, 2, 3, 4, 5, 6, 7, 8
# TensorProto.data_type → (numpy dtype name, typed field that may hold the values)
DATA_TYPES = {1: ("float32", 4), 2: ("uint8", 5), 3: ("int8", 5), 4: ("uint16", 5), 5: ("int16", 5),
              6: ("int32", 5), 7: ("int64", 7), 9: ("bool", 5), 10: ("float16", 5), 11: ("float64", 10),
              12: ("uint32", 11), 13: ("uint64", 11)}
EXTERNAL = 1  # TensorProto.data_location


class OnnxWireError(ModelDirError):
    """model.onnx is not a protobuf this reader accepts (malformed, or uses a refused feature)."""


@dataclass
class Tensor:
    """A TensorProto: its data stays as raw bytes/value lists; ``external`` is its external_data table."""

    name: str = ""
    data_type: int = 0
    dims: List[int] = field(default_factory=list)
    raw_data: Optional[bytes] = None
    typed: Dict[int, list] = field(default_factory=dict)  # field number → values (float_data, int64_data, ...)
    external: Dict[str, str] = field(default_factory=dict)
    data_location: int = 0

    @property
    def is_external(self) -> bool:
        return self.data_location == EXTERNAL or bool(self.external)

    @property
    def has_inline_data(self) -> bool:
        return self.raw_data is not None or any(self.typed.values())


@dataclass
class SparseTensor:
    values: Tensor
    indices: Tensor
    dims: List[int]


@dataclass
class Attribute:
    name: str = ""
    type: int = 0
    f: float = 0.0
    i: int = 0
    s: bytes = b""
    t: Optional[Tensor] = None
    floats: List[float] = field(default_factory=list)
    ints: List[int] = field(default_factory=list)
    strings: List[bytes] = field(default_factory=list)


@dataclass
class Node:
    op_type: str = ""
    name: str = ""
    domain: str = ""
    inputs: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    attributes: List[Attribute] = field(default_factory=list)


@dataclass
class Model:
    ir_version: int = 0
    opsets: Dict[str, int] = field(default_factory=dict)
    nodes: List[Node] = field(default_factory=list)
    initializers: List[Tensor] = field(default_factory=list)
    sparse_initializers: List[SparseTensor] = field(default_factory=list)
    inputs: List[str] = field(default_factory=list)
    outputs: List[str] = field(default_factory=list)
    # graph input/output name → (elem_type, dims or None for an unknown rank); a dim is an int, or
    # its dim_param / "?" for a free axis; tensor types only
    value_types: Dict[str, Tuple[int, Optional[List[Any]]]] = field(default_factory=dict)
    # what onnxruntime's get_modelmeta() reports: producer_name, producer_version, domain, version,
    # description, graph_name, graph_description, and the metadata_props key → value map
    meta: Dict[str, Any] = field(default_factory=dict)
    metadata_props: Dict[str, str] = field(default_factory=dict)


def _varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:  # most varints (keys, small lengths) are one byte
        return buf[pos], pos + 1
    result = shift = 0
    for index in range(10):
        if pos + index >= len(buf):
            raise OnnxWireError("truncated varint")
        byte = buf[pos + index]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos + index + 1
        shift += 7
    raise OnnxWireError("varint longer than 10 bytes")


def _signed(value: int) -> int:
    """int64 fields are two's complement in a uint64 varint."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: memoryview) -> Iterator[Tuple[int, int, Any]]:
    """(field number, wire type, value): int for varints, memoryview for the others."""
    if not isinstance(buf, memoryview):
        raise OnnxWireError("a message field has the wrong wire type")
    pos, end = 0, len(buf)
    while pos < end:
        key = buf[pos]  # one-byte keys and lengths (nearly all of them) without a call
        key, pos = (key, pos + 1) if key < 0x80 else _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise OnnxWireError("field number 0")
        if wire == 2:
            size = buf[pos] if pos < end else 0x80
            size, pos = (size, pos + 1) if size < 0x80 else _varint(buf, pos)
            if size > end - pos:
                raise OnnxWireError("a field's length runs past the end of its message")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 0:
            value = buf[pos] if pos < end else 0x80
            value, pos = (value, pos + 1) if value < 0x80 else _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise OnnxWireError("truncated fixed-width field")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise OnnxWireError(f"wire type {wire} is not used by ONNX")
        yield number, wire, value


def _text(value: Any) -> str:
    if not isinstance(value, memoryview):
        raise OnnxWireError("a string field has the wrong wire type")
    try:
        return str(value, "utf-8")
    except UnicodeDecodeError:
        raise OnnxWireError("a string is not UTF-8") from None


def _int(wire: int, value: Any) -> int:
    if wire != 0:
        raise OnnxWireError("an integer field has the wrong wire type")
    return value


_UNPACKED_WIRE = {"varint": 0, "f32": 5, "f64": 1}


def _repeated(wire: int, value: Any, kind: str, into: list) -> None:
    """Append one value, or a packed run of them; ``kind`` is 'varint', 'f32' or 'f64'."""
    if wire == 2:  # packed
        buf, pos = value, 0
        if kind == "varint":
            while pos < len(buf):
                item, pos = _varint(buf, pos)
                into.append(_signed(item))
                if len(into) > MAX_REPEATED:
                    raise OnnxWireError(f"more than {MAX_REPEATED} values in one field")
            return
        size, code = (4, "<f") if kind == "f32" else (8, "<d")
        if len(buf) % size or len(into) + len(buf) // size > MAX_REPEATED:
            raise OnnxWireError("a packed list has a bad length")
        into.extend(v for (v,) in struct.iter_unpack(code, buf))
        return
    if wire != _UNPACKED_WIRE[kind]:
        raise OnnxWireError("a repeated field has the wrong wire type")
    into.append((value - (1 << 64) if value >= 1 << 63 else value) if kind == "varint"
                else struct.unpack("<f" if kind == "f32" else "<d", value)[0])
    if len(into) > MAX_REPEATED:
        raise OnnxWireError(f"more than {MAX_REPEATED} values in one field")


class _RefusedField(OnnxWireError):
    """A field this reader refuses; ``parse_model`` names the container (a MODEL_DIR, a plain file)."""

    def __init__(self, message: str, number: int) -> None:
        super().__init__(f"{message} field {number}")


def _refuse(message: str, number: int) -> OnnxWireError:
    return _RefusedField(message, number)


_TYPED_KINDS = {4: "f32", 5: "varint", 7: "varint", 10: "f64", 11: "varint"}


def parse_tensor(buf: memoryview) -> Tensor:
    tensor = Tensor()
    for number, wire, value in _fields(buf):
        if number == 1:
            _repeated(wire, value, "varint", tensor.dims)
            if len(tensor.dims) > MAX_DIMS:
                raise OnnxWireError(f"tensor with more than {MAX_DIMS} dimensions")
        elif number == 2:
            tensor.data_type = _int(wire, value)
        elif number in _TYPED_KINDS:
            _repeated(wire, value, _TYPED_KINDS[number], tensor.typed.setdefault(number, []))
        elif number == 8:
            tensor.name = _text(value)
        elif number == 9:
            if wire != 2:
                raise OnnxWireError("raw_data has the wrong wire type")
            tensor.raw_data = bytes(value)
        elif number == 13:
            key, text = _string_entry(value)
            if key in tensor.external:
                raise OnnxWireError(f"external_data key {key!r} given twice")
            tensor.external[key] = text
        elif number == 14:
            tensor.data_location = _int(wire, value)
        elif number not in (12, 16):  # doc_string, metadata_props: carry no data
            raise _refuse("TensorProto", number)
    return tensor


def _string_entry(buf: Any) -> Tuple[str, str]:
    key = text = ""
    for number, _, value in _fields(buf):
        if number == 1:
            key = _text(value)
        elif number == 2:
            text = _text(value)
    return key, text


def _parse_sparse(buf: memoryview) -> SparseTensor:
    values, indices, dims = Tensor(), Tensor(), []
    for number, wire, value in _fields(buf):
        if number == 1:
            values = parse_tensor(value)
        elif number == 2:
            indices = parse_tensor(value)
        elif number == 3:
            _repeated(wire, value, "varint", dims)
            if len(dims) > MAX_DIMS:
                raise OnnxWireError(f"sparse tensor with more than {MAX_DIMS} dimensions")
        else:
            raise _refuse("SparseTensorProto", number)
    return SparseTensor(values, indices, dims)


def _parse_attribute(buf: memoryview) -> Attribute:
    attribute = Attribute()
    for number, wire, value in _fields(buf):
        if number == 1:
            attribute.name = _text(value)
        elif number == 20:
            attribute.type = _int(wire, value)
        elif number == 2:
            if wire != 5:
                raise OnnxWireError("float attribute has the wrong wire type")
            attribute.f = struct.unpack("<f", value)[0]
        elif number == 3:
            attribute.i = _signed(_int(wire, value))
        elif number == 4:
            attribute.s = bytes(value) if wire == 2 else b""
        elif number == 5:
            attribute.t = parse_tensor(value)
        elif number == 7:
            _repeated(wire, value, "f32", attribute.floats)
        elif number == 8:
            _repeated(wire, value, "varint", attribute.ints)
        elif number == 9:
            attribute.strings.append(bytes(value) if wire == 2 else b"")
        elif number != 13:  # doc_string
            raise _refuse("AttributeProto (subgraphs, sparse tensors, tensor lists, references)", number)
    if attribute.type not in (FLOAT, INT, STRING, TENSOR, FLOATS, INTS, STRINGS):
        raise OnnxWireError(f"attribute {attribute.name!r} has type {attribute.type}, "
                            "which this runtime does not read")
    return attribute


def _parse_node(buf: memoryview) -> Node:
    node = Node()
    for number, _, value in _fields(buf):
        if number == 1:
            node.inputs.append(_text(value))
        elif number == 2:
            node.outputs.append(_text(value))
        elif number == 3:
            node.name = _text(value)
        elif number == 4:
            node.op_type = _text(value)
        elif number == 5:
            node.attributes.append(_parse_attribute(value))
        elif number == 7:
            node.domain = _text(value)
        elif number not in (6, 9):  # doc_string, metadata_props
            raise _refuse("NodeProto", number)
    return node


def _dimension(buf: Any) -> Any:
    """TensorShapeProto.Dimension: dim_value, or dim_param (a name), or "?" when neither is given."""
    size: Any = "?"
    for number, wire, value in _fields(buf):
        if number == 1:
            size = _signed(_int(wire, value))
        elif number == 2:
            size = _text(value) or "?"
    return size


def _tensor_type(buf: Any) -> Tuple[int, Optional[List[Any]]]:
    """TypeProto.Tensor: elem_type and the shape's dims (None when the rank is unknown)."""
    elem, dims = 0, None
    for number, wire, value in _fields(buf):
        if number == 1:
            elem = _int(wire, value)
        elif number == 2:
            dims = []
            for dim_number, _, dim in _fields(value):
                if dim_number == 1:
                    dims.append(_dimension(dim))
                    if len(dims) > MAX_DIMS:
                        raise OnnxWireError(f"a value with more than {MAX_DIMS} dimensions")
    return elem, dims


def value_info_type(buf: Any) -> Tuple[str, Optional[Tuple[int, Optional[List[Any]]]]]:
    """A ValueInfoProto's name and, for a tensor type, ``(elem_type, dims)`` (None for other types)."""
    name, kind = "", None
    for number, _, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:
            for type_number, _, inner in _fields(value):
                if type_number == 1:  # tensor_type; sequences, maps, optionals stay None
                    kind = _tensor_type(inner)
    return name, kind


def _parse_graph(buf: memoryview, model: Model) -> None:
    for number, _, value in _fields(buf):
        if number == 1:
            model.nodes.append(_parse_node(value))
            if len(model.nodes) > MAX_NODES:
                raise OnnxWireError(f"more than {MAX_NODES} nodes")
        elif number == 5:
            model.initializers.append(parse_tensor(value))
        elif number == 15:
            model.sparse_initializers.append(_parse_sparse(value))
        elif number in (11, 12):
            name, kind = value_info_type(value)
            (model.inputs if number == 11 else model.outputs).append(name)
            if kind is not None:
                model.value_types[name] = kind
        elif number in (2, 10):
            model.meta["graph_name" if number == 2 else "graph_description"] = _text(value)
        elif number not in (13, 14, 16):  # value_info, quantization annotations, metadata
            raise _refuse("GraphProto", number)


def _parse_opset(buf: Any) -> Tuple[str, int]:
    domain, version = "", 0
    for number, wire, value in _fields(buf):
        if number == 1:
            domain = _text(value)
        elif number == 2:
            version = _int(wire, value)
    return domain, version


def parse_model(data: bytes, where: str = "model.onnx", container: str = "a MODEL_DIR") -> Model:
    """Decode an ONNX file's bytes; OnnxWireError (a ModelDirError) when malformed or refused, its message
    starting with ``where`` and naming ``container`` (what the file is part of) for a refused field."""
    try:
        return _parse_model(data)
    except _RefusedField as error:
        raise OnnxWireError(f"{where}: {error} is not accepted in {container}") from None
    except OnnxWireError as error:
        raise OnnxWireError(f"{where}: {error}") from None


# ModelProto fields onnxruntime's ModelMetadata reports (14, metadata_props, is its custom map)
_MODEL_META = {2: "producer_name", 3: "producer_version", 4: "domain", 5: "version", 6: "description"}


def _parse_model(data: bytes) -> Model:
    model, graphs = Model(), 0
    for number, wire, value in _fields(memoryview(data)):
        if number == 1:
            model.ir_version = _int(wire, value)
        elif number == 7:
            graphs += 1
            _parse_graph(value, model)
        elif number == 8:
            domain, version = _parse_opset(value)
            model.opsets[domain] = version
        elif number in _MODEL_META:
            model.meta[_MODEL_META[number]] = _int(wire, value) if number == 5 else _text(value)
        elif number == 14:
            key, text = _string_entry(value)
            model.metadata_props[key] = text
        else:
            raise _refuse("ModelProto (training info, functions, ...)", number)
    if graphs != 1:
        raise OnnxWireError(f"expected one graph, found {graphs}")
    return model
