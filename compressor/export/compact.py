"""Compact storage (MODEL_DIR format 3): every weight once, in its smallest form, fed to each engine at load.

Export first writes a format 1/2 MODEL_DIR (model.onnx whose weights are external data inside
weights.npz, checked against PyTorch), and ``--quantize int8`` adds model.int8.onnx; this step then
rewrites the folder so that no weight is stored twice:

- weights.npz keeps each prunable weight as CSR with the smallest column-index type (uint8/uint16)
  or dense, whichever is smaller, with float32, float16 or int8 values — no int64 ``coo`` copy of the
  indices for onnxruntime's sake;
- a weight the int8 variant quantized is stored only as its int8 values plus a float32 scale per
  output channel (or one per tensor), exactly the integers model.int8.onnx computes with; the fp32
  engines (native kernels, onnxruntime fp32) run those values dequantized, so their sample output and
  accuracy are measured again;
- model.onnx and model.int8.onnx keep small constants inline and hold *placeholders* for the rest,
  which the runtime fills from weights.npz (edge_runtime/ort_session.py). `edge-runtime to-onnx` turns
  a MODEL_DIR back into one plain ONNX file.

The rewritten folder is checked with the runtime itself (every engine against its sample) before it
replaces the original.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from compressor.errors import ExportError
from edge_runtime.model_format import (FED_LOCATION, FORMAT_VERSION_COMPACT, MANIFEST_FILE, ONNX_FILE, WEIGHTS_FILE,
                                       sha256_of, shipped_bytes)
from edge_runtime.safe_io import new_temp_dir_beside, replace_dir

VALUE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Quantized:
    """One weight as the int8 variant stores it, oriented like model.onnx's tensor."""

    values: np.ndarray          # int8, the weight's own shape
    scale: np.ndarray           # float32 [rows] (axis 0) or [1]
    per_row: bool
    variant_name: str           # the initializer in model.int8.onnx
    transpose: bool             # model.int8.onnx holds it transposed (Gemm rewritten as MatMul)


def _oriented(q: np.ndarray, scale: np.ndarray, trained: np.ndarray) -> Optional[Tuple[np.ndarray, bool]]:
    """``(q in the trained weight's orientation, transposed?)``, or None when neither orientation
    dequantizes to the trained weight. The quantizer may have transposed a weight (Gemm rewritten as
    MatMul), and a square weight's shape cannot tell: its values can — the right orientation is within
    half a quantization step of the trained values everywhere."""
    for transpose in (False, True):
        candidate = q.T if transpose else q
        if candidate.shape != trained.shape or (transpose and q.ndim != 2):
            continue
        matrix = candidate.reshape(candidate.shape[0], -1).astype(np.float32)
        steps = scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(1, 1)
        error = np.abs(matrix * steps - trained.reshape(trained.shape[0], -1))
        if np.all(error <= 0.5001 * steps + 1e-12):
            return np.ascontiguousarray(candidate), transpose
    return None


def _int8_weights(model_dir: Path, entry: Optional[Dict[str, Any]], decoded: Dict[str, np.ndarray]) -> Dict[str, Quantized]:
    """The weights model.int8.onnx quantized symmetrically (zero point 0), per output channel or per
    tensor, keyed by model.onnx's tensor name. Any other quantization stays in the variant file."""
    if entry is None:
        return {}
    import onnx

    from compressor.export.quantize import quantized_initializers

    stored, axes = quantized_initializers(onnx.load(str(model_dir / entry["file"]), load_external_data=False))
    found: Dict[str, Quantized] = {}
    for name, q in stored.items():
        base = name[:-len("_quantized")] if name.endswith("_quantized") else None
        if base not in decoded or q.dtype != np.int8 or decoded[base].dtype != np.float32:
            continue
        scale = stored.get(f"{base}_scale")
        zero = stored.get(f"{base}_zero_point", np.zeros(1, np.int8))
        if scale is None or scale.dtype != np.float32 or np.any(zero != 0):
            continue
        scale = scale.reshape(-1).astype(np.float32)
        per_row = scale.size > 1
        oriented = _oriented(q, scale, decoded[base])
        if oriented is None:
            continue
        if per_row:  # one scale per output channel: the quantizer's axis must become dimension 0
            axis = axes.get(name, 1) % q.ndim
            if axis != (1 if oriented[1] else 0):
                continue
        found[base] = Quantized(oriented[0], scale, per_row, name, oriented[1])
    return found


def _store(name: str, array: np.ndarray, info: Dict[str, Any], values: str,
           quantized: Optional[Quantized], weight: bool) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(manifest entry, npz members) of one tensor in format 3."""
    fed = info.get("onnx", "external") != "inline" and array.dtype == np.float32
    entry: Dict[str, Any] = {"shape": list(array.shape), "onnx": "fed" if fed else "inline"}
    if not fed:
        return {**entry, "storage": "dense", "dtype": str(array.dtype)}, {name: array}
    stored = quantized.values if quantized else array.astype(values) if weight else array
    form, members = _smallest(name, stored) if weight and stored.ndim >= 2 else ("dense", {name: stored})
    entry.update(storage="dense" if form == "dense" else "csr", dtype=str(stored.dtype))
    if form == "delta":
        entry["indices"] = "delta"
    if quantized:
        members[f"{name}.scale"] = quantized.scale
        entry["scale"] = f"{name}.scale"
        if quantized.per_row:
            entry["axis"] = 0
    return entry, members


def _wide(weight: np.ndarray) -> bool:
    """More columns than a uint8 column index reaches: only then can gaps (delta indices) be smaller."""
    return weight.size // max(weight.shape[0], 1) > 256


def _smallest(name: str, weight: np.ndarray) -> Tuple[str, Dict[str, np.ndarray]]:
    """``(form, weights.npz members)`` of the smallest storage for ``weight``: ``dense``, ``csr`` (column
    indices) or, for a wide matrix, ``delta`` (CSR with uint8 gaps, onnx_sparse.encode_delta_csr)."""
    from compressor.export.onnx_sparse import csr_bytes, encode_csr, encode_delta_csr

    options = [("dense", {name: weight}), ("csr", encode_csr(weight, weight.dtype).arrays(name))]
    if _wide(weight):
        delta = encode_delta_csr(weight, weight.dtype)
        options.append(("delta", {f"{name}.{key}": array for key, array in delta.items()}))
    return min(options, key=lambda option: csr_bytes(option[1]))  # a tie keeps the simpler form


def _placeholder(name: str, data_type: int, dims: List[int]) -> Any:
    """A TensorProto with no bytes, filled by the runtime at load; its location names no real file."""
    import onnx

    proto = onnx.TensorProto()
    proto.name, proto.data_type = name, data_type
    proto.dims.extend(dims)
    proto.data_location = onnx.TensorProto.EXTERNAL
    location = proto.external_data.add()
    location.key, location.value = "location", FED_LOCATION
    return proto


def _rewrite_onnx(path: Path, fed: Dict[str, Tuple[int, List[int]]],
                  inline: Optional[Dict[str, np.ndarray]] = None) -> bytes:
    """The ONNX file with each ``fed`` initializer (data type, dims) turned into a placeholder. With
    ``inline`` (model.onnx), every initializer is rebuilt: placeholders plus these small constants, no
    sparse initializers and no float16 Cast nodes (format 3 feeds float32); without (a variant file),
    its other initializers (scales, zero points) stay as they are."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if inline is None:
        kept = [t for t in graph.initializer if t.name not in fed]
    else:
        kept = [numpy_helper.from_array(array, name) for name, array in inline.items()]
        nodes = [n for n in graph.node if not (n.op_type == "Cast" and n.input[0].endswith("__fp16"))]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.sparse_initializer[:]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(_placeholder(name, data_type, dims) for name, (data_type, dims) in fed.items())
    return model.SerializeToString()


def compact_model_dir(model_dir: Path | str, values: str = "float32") -> Dict[str, Any]:
    """Rewrite a freshly exported MODEL_DIR (format 1/2, maybe with an int8 variant) as format 3, in
    place and atomically; returns the new manifest. ``values``: float32 or float16 for the weights
    that are not int8."""
    import onnx

    from edge_runtime import variants
    from edge_runtime.model_dir import Weights, read_manifest

    if values not in VALUE_DTYPES:
        raise ExportError(f"values must be one of {', '.join(VALUE_DTYPES)}, got {values!r}")
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if manifest["format_version"] >= FORMAT_VERSION_COMPACT:
        return manifest
    weights = Weights(model_dir, manifest)
    try:
        decoded = {name: weights.dense(name) for name in manifest["tensors"]}
        samples = {member: weights.archive.read(member) for member in _sample_members(manifest)}
    finally:
        weights.close()
    int8_entry = variants.find(manifest, "ort-int8")
    quantized = _int8_weights(model_dir, int8_entry, decoded)
    weight_names = {layer["weight"] for layer in manifest.get("layers", [])}

    tensors: Dict[str, Any] = {}
    arrays: Dict[str, np.ndarray] = {}
    for name, array in decoded.items():
        entry, members = _store(name, array, manifest["tensors"][name], values, quantized.get(name),
                                name in weight_names)
        tensors[name] = entry
        arrays.update(members)
    arrays.update(samples)

    temp = new_temp_dir_beside(model_dir, "compact")
    try:
        inline = {n: arrays[n] for n, e in tensors.items() if e["onnx"] == "inline"}
        fed = {n: (onnx.TensorProto.FLOAT, e["shape"]) for n, e in tensors.items() if e["onnx"] == "fed"}
        (temp / ONNX_FILE).write_bytes(_rewrite_onnx(model_dir / ONNX_FILE, fed, inline))
        new = dict(manifest, format_version=FORMAT_VERSION_COMPACT, tensors=tensors,
                   values_dtype=values, layers=[dict(layer, storage=tensors[layer["weight"]]["storage"])
                                                for layer in manifest.get("layers", [])])
        if values == "float16":
            new["sample"] = dict(new["sample"], atol=max(float(new["sample"].get("atol", 1e-4)), 1e-2))
        variant_feeds = {}
        if int8_entry is not None:
            placeholders = {q.variant_name: (onnx.TensorProto.INT8, list(q.values.T.shape if q.transpose else q.values.shape))
                            for q in quantized.values()}
            (temp / int8_entry["file"]).write_bytes(
                _rewrite_onnx(model_dir / int8_entry["file"], placeholders))
            variant_feeds = {q.variant_name: {"tensor": base, "transpose": q.transpose, "scale": f"{base}_scale"}
                             for base, q in quantized.items()}
        _write(temp, new, arrays, variant_feeds, int8_entry)
        if quantized or values != manifest.get("values_dtype", "float32"):
            # the fp32 engines now run int8 weights dequantized (or rounded to float16): the sample moves
            arrays[manifest["sample"]["output"]] = _fp32_output(temp, new)
            _write(temp, new, arrays, variant_feeds, int8_entry)
        _check_engines(temp)
        replace_dir(temp, model_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return read_manifest(model_dir)


def _sample_members(manifest: Dict[str, Any]) -> List[str]:
    sample = manifest.get("sample") or {}
    names = [sample.get("input"), sample.get("output"), *(sample.get("inputs") or {}).values()]
    return [name for name in dict.fromkeys(names) if name]


def _write(folder: Path, manifest: Dict[str, Any], arrays: Dict[str, np.ndarray],
           feeds: Dict[str, Any], int8_entry: Optional[Dict[str, Any]]) -> None:
    """weights.npz and manifest.json (hashes, sizes, variant entries) of the compact folder."""
    from compressor.export.onnx_npz import write_npz

    write_npz(folder / WEIGHTS_FILE, arrays)
    files = [ONNX_FILE, WEIGHTS_FILE] + ([int8_entry["file"]] if int8_entry else [])
    manifest["files"] = {name: sha256_of(folder / name) for name in files}
    sizes = {name: (folder / name).stat().st_size for name in files}
    manifest["sizes"] = {**(manifest.get("sizes") or {}), **sizes}
    if manifest.get("variants"):
        entries = []
        for entry in manifest["variants"]:
            entry = dict(entry, size=sizes[entry["file"]] + sizes[WEIGHTS_FILE])
            if int8_entry is not None and entry["file"] == int8_entry["file"]:
                entry["feeds"] = feeds
            entries.append(entry)
        manifest["variants"] = entries
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, separators=(",", ":")) + "\n")


def _fp32_output(folder: Path, manifest: Dict[str, Any]) -> np.ndarray:
    """The fp32 model's output on the sample input, onnxruntime running the weights as the folder stores them."""
    from edge_runtime.model_dir import read_sample
    from edge_runtime.session import InferenceSession

    feed, _, _ = read_sample(folder, manifest)
    session = InferenceSession(folder, kernels="ort", threads=1, verify=False)
    try:
        return session.run(None, feed)[0]
    finally:
        session.close()


def _check_engines(folder: Path) -> None:
    """Each engine of the compact folder against its recorded sample, through the runtime itself."""
    from edge_runtime import variants
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.model_dir import read_manifest, read_sample
    from edge_runtime.session import InferenceSession

    manifest = read_manifest(folder)
    feed, expected, atol = read_sample(folder, manifest)
    engines = ["ort", "sparse"] + [e for e in variants.ENGINES if variants.find(manifest, e)]
    for engine in engines:
        want, tolerance = variants.expected_sample(manifest, engine) or (expected, atol)
        try:
            session = InferenceSession(folder, kernels=engine, threads=1)
            got = session.run(None, feed)[0]
            session.close()
        except EdgeRuntimeError as error:
            if engine == "sparse":  # a model with ops the native kernels lack runs in onnxruntime only
                continue
            raise ExportError(f"the compact MODEL_DIR does not load with kernels={engine}: {error}") from error
        diff = float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0)) if got.shape == want.shape else np.inf
        if not diff <= tolerance:
            raise ExportError(f"the compact MODEL_DIR's {engine} engine differs from its sample by {diff:.3g}")


def compact_size(model_dir: Path | str) -> int:
    """The shipped bytes of a MODEL_DIR (the one definition, edge_runtime.model_format.shipped_bytes)."""
    from edge_runtime.model_dir import read_manifest

    return shipped_bytes(Path(model_dir), read_manifest(Path(model_dir)))
