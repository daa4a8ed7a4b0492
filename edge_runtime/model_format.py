"""The MODEL_DIR format, owned here: names, versions, manifest schema, sha256 and the error type.

Export writes this format, the runtime reads it, deploy and bench ship it; all of them import these
definitions instead of keeping copies. Standard library only, so that any side may import it cheaply.

A MODEL_DIR may come from someone else, so nothing in it is trusted: the manifest is checked against
a schema before any value in it is used, file names must stay inside the folder, and files are opened
only when they are regular files (a FIFO or a device would block or stream forever; a symlink could
point anywhere).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

from edge_runtime.errors import ModelDirError
from edge_runtime.safe_io import open_regular, sha256_of  # noqa: F401 (part of this module's API)

__all__ = ["shipped_bytes", "FORMAT", "FORMAT_VERSION", "FORMAT_VERSION_INPUTS", "FORMAT_VERSION_COMPACT",
           "SUPPORTED_VERSIONS", "INLINE_BYTES",
           "MANIFEST_FILE", "FED_LOCATION", "ONNX_FILE", "WEIGHTS_FILE", "PLANS_FILE", "SAMPLE_INPUT", "SAMPLE_OUTPUT",
           "ModelDirError", "sha256_of", "open_regular", "check_relative_name", "check_format",
           "validate_manifest", "read_manifest", "verify_files", "max_model_bytes", "itemsize"]

FORMAT = "edgeprune-model"
FORMAT_VERSION = 1          # what export writes for one float32 input and a float32 output: every runtime reads it
FORMAT_VERSION_INPUTS = 2   # several inputs or other dtypes: the reader must know `inputs`/`output_specs`
FORMAT_VERSION_COMPACT = 3  # compact storage: model.onnx holds no weights; every engine's weights are
                            # built at load from weights.npz (the smallest index types, fp32/fp16/int8 values)
SUPPORTED_VERSIONS = (1, 2, 3)  # what this runtime reads (and so what deploy may ship with it)
INLINE_BYTES = 1024         # a non-weight tensor this small stays inline in model.onnx (onnx's own
                            # external-data threshold); integer/bool tensors (shapes, axes, indices) always
MANIFEST_FILE = "manifest.json"
# A format-3 placeholder's external-data location: a file that never exists, so that a tool reading
# model.onnx on its own (onnx.load, stock onnxruntime) fails loudly instead of reading something else;
# use `edge-runtime to-onnx` for a plain file.
FED_LOCATION = "weights-fed-by-edge-runtime"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.npz"
PLANS_FILE = "plans.json"
SAMPLE_INPUT, SAMPLE_OUTPUT = "sample.input", "sample.output"
REQUIRED_FILES = (ONNX_FILE, WEIGHTS_FILE)

MAX_MANIFEST_BYTES = 64 << 20
DEFAULT_MAX_MODEL_BYTES = 2 << 30  # float32 bytes of all tensors together, and of one input batch
MAX_RANK = 8
MAX_INPUTS = 64
MAX_DIM = 2 ** 31 - 1  # the int32 indices the kernels compute with
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "uint16",
          "uint32", "uint64", "bool")
INPUT_DTYPES = {1: ("float32",), 2: DTYPES, 3: DTYPES}  # per format version: numeric and bool
# Where model.onnx keeps a tensor. Formats 1-2: "external" (data in weights.npz at the member's offset)
# or "inline" (small constants only). Format 3: "inline", or "fed": a placeholder whose values the
# runtime builds from weights.npz and hands onnxruntime at load (SessionOptions.add_external_initializers).
ONNX_PLACES = {1: ("external", "inline"), 2: ("external", "inline"), 3: ("fed", "inline")}
VALUE_DTYPES = ("float32", "float16", "int8")  # a CSR tensor's values; int8 carries a float32 scale member
MAX_OPSET = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")


def max_model_bytes() -> int:
    """The most bytes a MODEL_DIR may ask the runtime to allocate for its tensors (or one input batch).

    A manifest is small and can declare anything, so declared sizes are checked against this before
    allocating. ``EDGEPRUNE_MAX_MODEL_BYTES`` raises it for genuinely big models.
    """
    try:
        return max(int(os.environ.get("EDGEPRUNE_MAX_MODEL_BYTES", DEFAULT_MAX_MODEL_BYTES)), 1)
    except ValueError:
        return DEFAULT_MAX_MODEL_BYTES


def check_relative_name(name: Any, where: str = MANIFEST_FILE) -> str:
    """A file name the manifest lists: relative, '/'-separated, no '..', '.', empty part or control char."""
    if not isinstance(name, str) or not name:
        raise ModelDirError(f"{where}: file name {name!r} is not a non-empty string")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise ModelDirError(f"{where}: unsafe file name {name!r} (must stay inside MODEL_DIR)")
    if any(ord(ch) < 32 or ch == "\x7f" for ch in name):
        raise ModelDirError(f"{where}: file name {name!r} has control characters")
    return name


def check_format(manifest: Any, where: str, supported: Sequence[int] = SUPPORTED_VERSIONS) -> None:
    """The manifest is an edgeprune-model manifest of a version in ``supported``."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{where}: not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in supported:
        raise ModelDirError(f"{where}: format version {version!r} is not supported by this runtime "
                            f"(supports {', '.join(map(str, supported))}); upgrade it")


def listed_files(manifest: Mapping[str, Any], where: str) -> Dict[str, str]:
    """The manifest's ``files`` table {relative name: sha256}, every name safe, the required ones present."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ModelDirError(f"{where}: malformed manifest (files must be a table of sha256s)")
    for name, digest in files.items():
        check_relative_name(name, where)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ModelDirError(f"{where}: the sha256 of {name} is not 64 hex digits")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ModelDirError(f"{where}: manifest does not list {' and '.join(missing)} with a sha256")
    return dict(files)


def _fail(where: str, what: str) -> ModelDirError:
    return ModelDirError(f"{where}: malformed manifest ({what})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_shape(shape: Any, where: str, what: str, free_axis: bool = False) -> None:
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise _fail(where, f"{what} shape must be a list of at most {MAX_RANK} dimensions")
    for dim in shape:
        if free_axis and isinstance(dim, str):
            continue
        if not _is_int(dim) or not 0 <= dim <= MAX_DIM:
            raise _fail(where, f"{what} shape {shape!r} has a dimension that is not an integer in [0, {MAX_DIM}]")


def _elements(shape: Iterable[Any]) -> int:
    return math.prod(1 if isinstance(d, str) else d for d in shape)


def _check_strings(values: Any, where: str, what: str, allow_empty: bool = False) -> None:
    if not isinstance(values, list) or not all(isinstance(v, str) and (v or allow_empty) for v in values):
        raise _fail(where, f"{what} must be a list of names")


def itemsize(dtype: str) -> int:
    """Bytes per element of one of the format's dtype names (stdlib only: no numpy here)."""
    return 1 if dtype in ("bool", "int8", "uint8") else 2 if dtype.endswith("16") else \
        8 if dtype.endswith("64") else 4


def _check_input(spec: Any, where: str, version: int) -> int:
    """One input spec; returns the bytes one example of it takes."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _fail(where, "input must have a name, shape and dtype")
    allowed = INPUT_DTYPES.get(version, INPUT_DTYPES[1])
    if spec.get("dtype") not in allowed:
        raise _fail(where, f"input dtype {spec.get('dtype')!r} is not one of {', '.join(allowed)} "
                           f"(format version {version})")
    _check_shape(spec.get("shape"), where, "input", free_axis=True)
    if not spec["shape"] or 0 in spec["shape"]:
        raise _fail(where, "input shape must have a batch axis and no empty dimension")
    nbytes = _elements(spec["shape"]) * itemsize(spec["dtype"])
    if nbytes > max_model_bytes():
        raise ModelDirError(f"{where}: one input example of shape {spec['shape']} would take more than "
                            f"{max_model_bytes():,} bytes (EDGEPRUNE_MAX_MODEL_BYTES)")
    return nbytes


def _check_inputs(manifest: Mapping[str, Any], where: str) -> None:
    """``input`` (every version), and ``inputs`` (version 2: one or more; version 1: only ``[input]``)."""
    version = manifest["format_version"]
    _check_input(manifest["input"], where, version)
    specs = manifest.get("inputs", [manifest["input"]])
    if not isinstance(specs, list) or not specs or len(specs) > MAX_INPUTS:
        raise _fail(where, f"inputs must be a list of 1 to {MAX_INPUTS} input specs")
    if specs[0] != manifest["input"] or (version == 1 and len(specs) != 1):
        raise _fail(where, "inputs must start with input (and, in format version 1, be only that)")
    total = sum(_check_input(spec, where, version) for spec in specs)
    if len({spec["name"] for spec in specs}) != len(specs):
        raise _fail(where, "input names must be distinct")
    if total > max_model_bytes():
        raise ModelDirError(f"{where}: one example of all inputs would take {total:,} bytes, more than "
                            f"{max_model_bytes():,} (EDGEPRUNE_MAX_MODEL_BYTES)")


def _check_output_specs(manifest: Mapping[str, Any], where: str) -> None:
    """``output_specs`` (optional): a name, shape and dtype per output (version 1: float32 only)."""
    specs = manifest.get("output_specs")
    if specs is None:
        return
    allowed = ("float32",) if manifest["format_version"] == 1 else DTYPES
    if not isinstance(specs, list):
        raise _fail(where, "output_specs must be a list")
    for spec in specs:
        if not isinstance(spec, dict) or spec.get("name") not in manifest["outputs"]:
            raise _fail(where, "each output spec must name one of outputs")
        if spec.get("dtype") not in allowed:
            raise _fail(where, f"output dtype {spec.get('dtype')!r} is not one of {', '.join(allowed)}")
        _check_shape(spec.get("shape"), where, "output", free_axis=True)


def _check_attribute(value: Any, depth: int = 0) -> bool:
    """JSON attribute values as export writes them: numbers, strings, flat lists, tensor dicts."""
    if isinstance(value, str) or _is_int(value) or isinstance(value, float):
        return True
    if isinstance(value, list) and depth == 0:
        return all(_check_attribute(v, 1) for v in value)
    if isinstance(value, dict) and depth == 0:
        return set(value) == {"tensor", "dtype", "shape"} and value["dtype"] in DTYPES
    return False


def _check_graph(nodes: Any, where: str) -> None:
    if not isinstance(nodes, list) or not nodes:
        raise _fail(where, "graph must be a non-empty list of nodes")
    for index, node in enumerate(nodes):
        what = f"graph node {index}"
        if not isinstance(node, dict):
            raise _fail(where, f"{what} is not an object")
        missing = [k for k in ("op_type", "inputs", "outputs", "attributes") if k not in node]
        if missing:
            raise _fail(where, f"{what} lacks {', '.join(missing)}")
        if not isinstance(node["op_type"], str) or not node["op_type"]:
            raise _fail(where, f"{what} has no op_type")
        if not isinstance(node.get("name", ""), str) or not isinstance(node.get("domain", ""), str):
            raise _fail(where, f"{what} name and domain must be strings")
        _check_strings(node["inputs"], where, f"{what} inputs", allow_empty=True)
        _check_strings(node["outputs"], where, f"{what} outputs", allow_empty=True)
        if not node["outputs"] or not node["outputs"][0]:
            raise _fail(where, f"{what} has no output")
        attributes = node["attributes"]
        if not isinstance(attributes, dict) or not all(_check_attribute(v) for v in attributes.values()):
            raise _fail(where, f"{what} attributes must be numbers, strings, lists of them or tensors")


def _check_tensors(tensors: Any, where: str, version: int) -> None:
    if not isinstance(tensors, dict):
        raise _fail(where, "tensors must be a table")
    total = 0
    for name, info in tensors.items():
        if not name or not isinstance(info, dict) or info.get("storage") not in ("csr", "dense"):
            raise _fail(where, f"tensor {name!r} must have storage csr or dense")
        if info.get("dtype") not in DTYPES:
            raise _fail(where, f"tensor {name!r} has dtype {info.get('dtype')!r}")
        _check_shape(info.get("shape"), where, f"tensor {name!r}")
        values = VALUE_DTYPES if version >= FORMAT_VERSION_COMPACT else ("float32", "float16")
        if info["storage"] == "csr" and (not info["shape"] or info.get("dtype") not in values):
            raise _fail(where, f"CSR tensor {name!r} must have a shape and values of {', '.join(values)}")
        place = info.get("onnx", "external")  # format 1 before inline constants: every tensor external
        places = ONNX_PLACES.get(version, ONNX_PLACES[max(ONNX_PLACES)])  # a later format: as the latest
        if place not in places or (info["storage"] == "csr" and place == "inline"):
            raise _fail(where, f"tensor {name!r} must be {' or '.join(places)} in model.onnx "
                               "(a CSR tensor never inline)")
        if "indices" in info and not (version >= FORMAT_VERSION_COMPACT and info["storage"] == "csr"
                                      and info["indices"] == "delta"):
            raise _fail(where, f"tensor {name!r}: indices may only be \"delta\", for a CSR tensor of format 3")
        _check_quantized(name, info, where, version)
        total += _elements(info["shape"]) * max(4, 8 if info["dtype"].endswith("64") else 4)
    if total > max_model_bytes():
        raise ModelDirError(f"{where}: the manifest's tensors would take {total:,} bytes, more than "
                            f"{max_model_bytes():,} (EDGEPRUNE_MAX_MODEL_BYTES)")


def _check_quantized(name: str, info: Mapping[str, Any], where: str, version: int) -> None:
    """An int8 weight (format 3) names its float32 scale member; ``axis`` 0 means one scale per row
    (output channel), no axis one scale for the whole tensor."""
    fed_int8 = version >= FORMAT_VERSION_COMPACT and info["dtype"] == "int8" and info.get("onnx") == "fed"
    if not fed_int8:
        if "scale" in info or "axis" in info:
            raise _fail(where, f"tensor {name!r}: only a fed int8 tensor has a scale")
        return
    if not isinstance(info.get("scale"), str) or not info["scale"]:
        raise _fail(where, f"int8 tensor {name!r} must name its scale member")
    if info.get("axis", 0) != 0 or isinstance(info.get("axis"), bool):
        raise _fail(where, f"int8 tensor {name!r}: axis must be 0 (one scale per row) or absent (one scale)")


def _check_optional(manifest: Mapping[str, Any], where: str) -> None:
    """Keys that only `info` and `check` read: when present, of the type they read."""
    layers = manifest.get("layers", [])
    layer_types = {"name": str, "op": str, "weight": str, "storage": str}
    if not isinstance(layers, list) or not all(
            isinstance(layer, dict) and all(isinstance(layer.get(k), t) for k, t in layer_types.items())
            and _is_number(layer.get("sparsity")) and isinstance(layer.get("shape"), list) for layer in layers):
        raise _fail(where, "layers must be a list of {name, op, weight, shape, sparsity, storage}")
    for key in ("sparsity",):
        if key in manifest and not _is_number(manifest[key]):
            raise _fail(where, f"{key} must be a number")
    if manifest.get("accuracy") is not None and not _is_number(manifest["accuracy"]):
        raise _fail(where, "accuracy must be a number or null")
    sizes = manifest.get("sizes", {})
    if not isinstance(sizes, dict) or not all(_is_int(v) for v in sizes.values()):
        raise _fail(where, "sizes must be a table of byte counts")
    sample = manifest.get("sample")
    if sample is not None and not (isinstance(sample, dict) and isinstance(sample.get("input"), str)
                                   and isinstance(sample.get("output"), str)
                                   and _is_number(sample.get("atol", 1e-4))):
        raise _fail(where, "sample must name an input and an output member and a numeric atol")
    members = (sample or {}).get("inputs")
    names = [spec["name"] for spec in manifest.get("inputs", [manifest["input"]])]
    if members is not None and not (isinstance(members, dict) and sorted(members) == sorted(names)
                                    and all(isinstance(v, str) and v for v in members.values())):
        raise _fail(where, "sample.inputs must name one npz member for each input")
    opset = manifest.get("opset")
    if opset is not None and not (_is_int(opset) and 1 <= opset <= MAX_OPSET):
        raise _fail(where, f"opset must be an integer in [1, {MAX_OPSET}]")


def validate_manifest(manifest: Any, where: str, supported: Sequence[int] = SUPPORTED_VERSIONS) -> Dict[str, Any]:
    """Check a parsed manifest against the schema; returns it, or raises a one-line ModelDirError."""
    check_format(manifest, where, supported)
    missing = [key for key in ("input", "outputs", "graph", "tensors", "files") if key not in manifest]
    if missing:
        raise ModelDirError(f"{where}: manifest lacks {', '.join(missing)}")
    listed_files(manifest, where)
    _check_inputs(manifest, where)
    _check_strings(manifest["outputs"], where, "outputs")
    if not manifest["outputs"]:
        raise _fail(where, "outputs must name at least one output")
    _check_output_specs(manifest, where)
    _check_graph(manifest["graph"], where)
    _check_tensors(manifest["tensors"], where, manifest["format_version"])
    _check_optional(manifest, where)
    return manifest


def load_manifest_json(model_dir: Path) -> Any:
    """manifest.json parsed as JSON (no schema check): a regular file, of bounded size."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: no such MODEL_DIR")
    path = model_dir / MANIFEST_FILE
    if not os.path.lexists(path):
        raise ModelDirError(f"{model_dir}: no manifest.json (not a MODEL_DIR)")
    with open_regular(path) as handle:
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelDirError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES:,} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ModelDirError(f"{path}: corrupt manifest, not valid JSON ({str(error)[:200]})") from None


def read_manifest(model_dir: Path, supported: Sequence[int] = SUPPORTED_VERSIONS) -> Dict[str, Any]:
    """Parse manifest.json and check it against the schema; ModelDirError names what is wrong."""
    return validate_manifest(load_manifest_json(model_dir), str(Path(model_dir) / MANIFEST_FILE), supported)


def shipped_bytes(model_dir: Path, manifest: Mapping[str, Any]) -> int:
    """A model's size, defined once for export, info, bench and ls: the bytes a deployment ships —
    every file the manifest lists plus manifest.json itself. Never ``plans.json``, the cache a device
    writes beside them (a plain ``.onnx`` file: its own size)."""
    model_dir = Path(model_dir)
    if manifest.get("source") == "onnx":
        return model_dir.stat().st_size
    names = [*manifest.get("files", {}), MANIFEST_FILE]
    return sum((model_dir / name).stat().st_size for name in dict.fromkeys(names))


def verify_files(model_dir: Path, manifest: Mapping[str, Any], names: Optional[Iterable[str]] = None) -> None:
    """Check every file the manifest lists (or ``names`` of them) against its sha256."""
    model_dir = Path(model_dir)
    files = listed_files(manifest, str(model_dir / MANIFEST_FILE))
    for name in names if names is not None else files:
        path = inside(model_dir, name)
        if sha256_of(path) != files[name]:
            raise ModelDirError(f"{model_dir}: {name} fails its sha256 check (corrupt or modified)")


def inside(model_dir: Path, name: str) -> Path:
    """``model_dir / name`` after checking that no part of the way there is a symlink leaving the folder."""
    check_relative_name(name, str(Path(model_dir) / MANIFEST_FILE))
    path = Path(model_dir) / name
    root = Path(model_dir).resolve()
    if os.path.lexists(path) and not path.parent.resolve().is_relative_to(root):
        raise ModelDirError(f"{model_dir}: {name} lies outside MODEL_DIR (through a symlink)")
    return path


def structured_summary(source: object, params_removed: float) -> str:
    """``params 1,234 of 5,678 (78.3% removed), MACs 80.1% removed`` for a --structure channels export
    (its manifest's source says so: export writes ``structure`` and the params and MACs of the level and
    of the dense level; older ones carry the family only); ``""`` for anything else."""
    source = source if isinstance(source, dict) else {}
    family = source.get("family")
    if source.get("structure") != "channels" and not (isinstance(family, str) and family.startswith("channels:")):
        return ""
    params, dense_params, macs, dense_macs = (_count_or_none(source.get(key))
                                              for key in ("params", "dense_params", "macs", "dense_macs"))
    if params is not None and dense_params:
        text = f"params {params:,} of {dense_params:,} ({1 - params / dense_params:.1%} removed)"
    else:
        text = f"{params_removed:.1%} of params removed"
    if macs is not None and dense_macs:
        text += f", MACs {1 - macs / dense_macs:.1%} removed"
    return text


def _count_or_none(value: Any) -> Optional[int]:
    """A non-negative integer from a manifest (which may come from anywhere), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
