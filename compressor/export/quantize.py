"""``edgeprune export --quantize int8``: add an int8 variant to a written MODEL_DIR.

The fp32 MODEL_DIR stays exactly what it was (a reader that does not know ``variants`` still loads
model.onnx); the int8 model is one more file, ``model.int8.onnx`` (self-contained: int8 weights
inline), hashed in the manifest's ``files`` and described in its ``variants`` list.

How it is built, with onnxruntime's own quantization tools:
- a model with a Conv: static QDQ, per-channel int8 weights, uint8 activations, calibrated on a few
  batches of the run's own training data (built-in data only; else seeded noise, said in one line);
- otherwise dynamic quantization (weights int8 now, activations at run time). onnxruntime's dynamic
  quantizer skips Gemm, and torch exports ``nn.Linear`` as Gemm: Gemm becomes MatMul + Add first.
Weights are quantized symmetrically (zero point 0), so a pruned zero stays exactly zero; this is
checked on the written model, not assumed.

Every variant's accuracy is measured with onnxruntime on the run's test split (built-in data), and
with ``max_drop`` a variant that loses more than that many points against the dense level is not
shipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from compressor.errors import ExportError
from edge_runtime.safe_io import atomic_write_text, atomic_writer, new_temp_dir_beside, sha256_of

INT8_FILE = "model.int8.onnx"
ONNX_FILE, WEIGHTS_FILE, MANIFEST_FILE = "model.onnx", "weights.npz", "manifest.json"
CALIBRATION_BATCH = 32    # examples per calibration batch
EVAL_BATCH = 256
SAMPLE_VALUES = 4096      # an int8 sample output up to this many values is kept in the manifest


@dataclass
class VariantResult:
    """What happened to one quantized variant: shipped or not, and why."""

    name: str
    shipped: bool
    accuracy: Optional[float]
    size: int
    message: str


# -- a plain dense fp32 copy of model.onnx, in memory ------------------------------------------------
def dense_model(model_dir: Path) -> Any:
    """model.onnx with every weight inline and dense (sparse initializers expanded), the form
    onnxruntime's quantizer reads. Refuses a float16 export (its weights sit behind Cast nodes)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(model_dir / ONNX_FILE), load_external_data=False)
    graph = model.graph
    for tensor in [*graph.initializer, *(s.values for s in graph.sparse_initializer)]:
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(model_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    if any(t.name.endswith("__fp16") for t in [*graph.initializer, *(s.values for s in graph.sparse_initializer)]):
        raise ExportError("--quantize int8 needs float32 weights; export without --fp16")
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices)
        dims = tuple(sparse.dims)
        flat = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
        flat[indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, dims)] = values
        graph.initializer.append(numpy_helper.from_array(flat.reshape(dims), sparse.values.name))
    del graph.sparse_initializer[:]
    return model


def gemm_to_matmul(model: Any) -> None:
    """Rewrite each plain Gemm (weight an initializer, alpha = beta = 1, no transA) as MatMul + Add,
    in place: onnxruntime's dynamic quantizer handles MatMul, not Gemm."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (node.op_type == "Gemm" and node.input[1] in inits and not attrs.get("transA", 0)
                 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        if not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight.T), node.input[1]))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}/matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=f"{node.name}/MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}/Add"))
    del graph.node[:]
    graph.node.extend(nodes)


def has_conv(model: Any) -> bool:
    return any(node.op_type == "Conv" for node in model.graph.node)


# -- calibration and evaluation data ------------------------------------------------------------------
def _builtin(data_spec: Optional[str]) -> bool:
    """Data we may load: built-in sets. A data factory (file.py:factory) is code the run names: never run
    by a reader unless the user named it (``--data``), which export passes as ``trusted=True``."""
    return bool(data_spec) and (data_spec == "digits" or data_spec.startswith("cifar10:"))


def usable_data(data_spec: Optional[str], trusted: bool = False) -> bool:
    """Whether calibration and accuracy may load ``data_spec``: built-in, or a factory the user named."""
    return _builtin(data_spec) or (trusted and bool(data_spec))


def _loaders(data_spec: str, input_shape: Sequence[int], batch: int):
    from compressor.train.data import load_data

    return load_data(data_spec, input_shape, batch, 0)


def _numpy_inputs(batch: Any) -> Tuple[np.ndarray, np.ndarray]:
    from compressor.train.batches import split_batch

    inputs, target = split_batch(batch)
    if not hasattr(inputs, "numpy"):
        raise ExportError("--quantize int8 supports models with a single tensor input")
    return np.ascontiguousarray(inputs.numpy().astype(np.float32)), target.numpy()


def calibration_batches(data_spec: Optional[str], input_shape: Sequence[int], count: int,
                        warn=None, trusted: bool = False) -> List[np.ndarray]:
    """``count`` input batches from the run's training data (or the ``--data`` factory the user named:
    ``trusted``), or seeded noise of ``input_shape`` (with one warning line) when there is none here."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    if usable_data(data_spec, trusted):
        try:
            train, _ = _loaders(data_spec, input_shape, CALIBRATION_BATCH)
            batches = []
            for batch in train:
                batches.append(_numpy_inputs(batch)[0])
                if len(batches) == count:
                    return batches
            if batches:
                return batches
        except ExportError:
            raise
        except Exception as error:  # the data is only a better calibration set; noise still works
            warn(f"warning: cannot load {data_spec} for calibration ({error}); calibrating on seeded noise")
    else:
        warn("warning: no training data for this model (a run with built-in data, or --data FILE.py:FACTORY); "
             "calibrating int8 on seeded noise (accuracy may suffer)")
    rng = np.random.default_rng(0)
    return [rng.standard_normal((CALIBRATION_BATCH, *input_shape)).astype(np.float32) for _ in range(count)]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of batches."""

    def __init__(self, name: str, batches: List[np.ndarray]) -> None:
        self._feeds: Iterator[Dict[str, np.ndarray]] = iter([{name: b} for b in batches])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._feeds, None)


def accuracy_of(model: Any, data_spec: Optional[str], input_shape: Sequence[int],
                trusted: bool = False) -> Optional[float]:
    """Top-1 accuracy (a fraction) on the run's test split of an ONNX file (a path) or of a session
    (anything with onnxruntime's ``get_inputs``/``run``); None without usable data (see ``usable_data``)."""
    if not usable_data(data_spec, trusted):
        return None
    import onnxruntime as ort

    session = model
    if isinstance(model, (str, Path)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    _, test = _loaders(data_spec, input_shape, EVAL_BATCH)
    right = total = 0
    for batch in test:
        x, y = _numpy_inputs(batch)
        scores = session.run(None, {name: x})[0]
        right += int((scores.reshape(len(x), -1).argmax(axis=1) == y.reshape(-1)).sum())
        total += len(x)
    return right / total if total else None


# -- building and checking the int8 model --------------------------------------------------------------
def quantize_int8(fp32: Any, out_path: Path, input_name: str, calibration: List[np.ndarray]) -> str:
    """Write the int8 model of the dense fp32 ``fp32`` (onnx ModelProto); returns the method used."""
    static = has_conv(fp32)
    if not static:
        gemm_to_matmul(fp32)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer writes advice ("consider pre-processing") to the root logger
    try:
        _run_quantizer(fp32, out_path, input_name, calibration, static)
    finally:
        root.setLevel(level)
    return "static-qdq-per-channel" if static else "dynamic"


def _run_quantizer(fp32: Any, out_path: Path, input_name: str, calibration: List[np.ndarray], static: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "fp32.onnx"
        onnx.save(fp32, str(source))
        # reduce_range (7-bit weights): x86 CPUs without VNNI multiply uint8 x int8 pairs into int16 with
        # saturation, which full-range weights overflow (measured: 11% error on an AMD EPYC / AVX2 where
        # the tolerance is 5%); a device that runs the MODEL_DIR may be such a CPU. The 7th bit's accuracy
        # is what export measures and --max-drop bounds. Symmetric, zero point 0: pruned zeros stay zero.
        if static:
            quantize_static(str(source), str(out_path), _Reader(input_name, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, reduce_range=True,
                            extra_options={"WeightSymmetric": True})
        else:
            quantize_dynamic(str(source), str(out_path), weight_type=QuantType.QInt8, reduce_range=True,
                             extra_options={"WeightSymmetric": True})


def quantized_initializers(model: Any) -> Tuple[Dict[str, np.ndarray], Dict[str, int]]:
    """A quantized ONNX model's initializers as arrays (``W_quantized``, ``W_scale``, ``W_zero_point``
    as onnxruntime's quantizer names them), and the ``axis`` of each DequantizeLinear by its input."""
    from onnx import helper, numpy_helper

    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    axes = {n.input[0]: helper.get_attribute_value(a) for n in model.graph.node
            if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"}
    return stored, axes


def zeros_kept(fp32: Any, quantized: Any) -> Dict[str, bool]:
    """For each quantized weight of ``fp32``: whether every zero entry quantized to its zero point."""
    from onnx import numpy_helper

    originals = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    stored, axes = quantized_initializers(quantized)
    kept: Dict[str, bool] = {}
    for name, q in stored.items():
        base = name[:-len("_quantized")] if name.endswith("_quantized") else None
        if base is None or q.dtype not in (np.int8, np.uint8) or base not in originals:
            continue
        original = originals[base]
        point = stored.get(f"{base}_zero_point", np.zeros((), q.dtype))
        if original.shape != q.shape:
            continue
        if point.size > 1:  # per channel: broadcast along the quantization axis
            axis = axes.get(name, next(i for i in reversed(range(q.ndim)) if q.shape[i] == point.size))
            shape = [1] * q.ndim
            shape[axis] = point.size
            point = point.reshape(shape)
        expected = np.broadcast_to(point, q.shape)
        kept[base] = bool(np.array_equal(q[original == 0], expected[original == 0]))
    return kept


def add_int8_variant(model_dir: Path | str, *, data_spec: Optional[str], input_shape: Sequence[int],
                     calibration_batches_count: int = 8, reference_accuracy: Optional[float] = None,
                     max_drop: Optional[float] = None, warn=None, trusted_data: bool = False) -> List[VariantResult]:
    """Build, check and measure the int8 variant of a fp32 MODEL_DIR; ship it unless it loses more than
    ``max_drop`` points against ``reference_accuracy`` (a fraction; None: this level's fp32 accuracy).
    ``trusted_data``: ``data_spec`` is a factory the user named (``--data``), so it may run.
    Records ``variants`` in the manifest."""
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    if manifest.get("format_version", 1) >= 3:
        raise ExportError(f"{model_dir} is already compact (format 3); export again with --quantize int8")
    inputs = manifest.get("inputs") or [manifest["input"]]
    if len(inputs) != 1 or inputs[0]["dtype"] != "float32":
        raise ExportError("--quantize int8 supports models with a single float32 input")
    if calibration_batches_count < 1:
        raise ExportError(f"--calibration-batches must be at least 1, got {calibration_batches_count}")
    shape = tuple(int(d) for d in inputs[0]["shape"][1:])
    fp32 = dense_model(model_dir)
    calibration = (calibration_batches(data_spec, shape, calibration_batches_count, warn, trusted_data)
                   if has_conv(fp32) else [])
    # the quantizer writes by path: into a folder of our own (created exclusively), never through a
    # name someone could have planted in the MODEL_DIR
    private = new_temp_dir_beside(model_dir / INT8_FILE)
    temp = private / INT8_FILE
    try:
        try:
            method = quantize_int8(fp32, temp, inputs[0]["name"], calibration)
        except Exception as error:  # the quantizer's own errors (an op it cannot handle) are not typed
            first = (str(error).splitlines() or [type(error).__name__])[0]
            raise ExportError(f"int8 quantization failed ({first}); {model_dir} holds the fp32 model only") from error
        _check_int8(fp32, temp)
        fp32_accuracy = accuracy_of(model_dir / ONNX_FILE, data_spec, shape, trusted_data)
        int8_accuracy = accuracy_of(temp, data_spec, shape, trusted_data)
        reference = fp32_accuracy if reference_accuracy is None else reference_accuracy
        result = _decide(int8_accuracy, temp.stat().st_size, reference, max_drop)
        variants = [_fp32_entry(model_dir, manifest, fp32_accuracy)]
        if result.shipped:
            with atomic_writer(model_dir / INT8_FILE) as handle, open(temp, "rb") as source:
                shutil.copyfileobj(source, handle)
            variants.append({"name": "int8", "file": INT8_FILE, "engine": "ort-int8", "method": method,
                             "accuracy": int8_accuracy, "size": result.size,
                             "calibration_batches": len(calibration),
                             "sample": _int8_sample(model_dir / INT8_FILE, model_dir, manifest, method)})
        _write_manifest(model_dir, manifest, variants)
        return [result]
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _int8_sample(path: Path, model_dir: Path, manifest: Dict[str, Any], method: str) -> Optional[Dict[str, Any]]:
    """The int8 model's output on the MODEL_DIR's sample input: what ``edge-runtime check`` compares an
    int8 engine against (the fp32 sample output differs by the quantization error). Kept only when small."""
    import onnxruntime as ort

    sample = manifest.get("sample") or {}
    with np.load(model_dir / WEIGHTS_FILE, allow_pickle=False) as npz:
        x = npz[sample["input"]]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    out = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {
        manifest["input"]["name"]: x})[0]
    if out.size > SAMPLE_VALUES:
        return None
    # Dynamic quantization is integer arithmetic then one float scale: onnxruntime versions agree closely.
    # Static QDQ may be fused differently by another onnxruntime build, moving a value by a step or two.
    scale = float(np.max(np.abs(out), initial=1.0))
    atol = 1e-4 * scale if method == "dynamic" else 0.05 * scale
    return {"output": out.astype(np.float64).ravel().tolist(), "shape": list(out.shape), "atol": atol}


def _check_int8(fp32: Any, path: Path) -> None:
    import onnx

    bad = [name for name, ok in zeros_kept(fp32, onnx.load(str(path))).items() if not ok]
    if bad:
        raise ExportError(f"int8 quantization moved pruned zeros of {', '.join(bad)} off the zero point")


def _decide(accuracy: Optional[float], size: int, reference: Optional[float],
            max_drop: Optional[float]) -> VariantResult:
    if max_drop is not None and reference is not None and accuracy is not None:
        drop = 100.0 * (reference - accuracy)
        if drop > max_drop:
            return VariantResult("int8", False, accuracy, size,
                                 f"int8 variant not shipped: accuracy {accuracy:.2%} is {drop:.2f} points below "
                                 f"the reference {reference:.2%} (more than {max_drop:g}; --quantize int8 ships "
                                 "it anyway, --max-drop sets the bound)")
    shown = f"accuracy {accuracy:.2%}" if accuracy is not None else "accuracy not measured (no built-in test data)"
    return VariantResult("int8", True, accuracy, size, f"int8 variant {INT8_FILE}: {size / 1024:.1f} KiB, {shown}")


def _fp32_entry(model_dir: Path, manifest: Dict[str, Any], accuracy: Optional[float]) -> Dict[str, Any]:
    size = sum((model_dir / name).stat().st_size for name in (ONNX_FILE, WEIGHTS_FILE))
    # the fp32 variant is what every reader already loads: native kernels read weights.npz, onnxruntime model.onnx
    return {"name": "fp32", "file": ONNX_FILE, "engine": "ort", "native": True,
            "accuracy": accuracy if accuracy is not None else manifest.get("accuracy"), "size": size}


def _write_manifest(model_dir: Path, manifest: Dict[str, Any], variants: List[Dict[str, Any]]) -> None:
    """Record the variants and hash their files; manifest.json is replaced atomically."""

    manifest = dict(manifest)
    manifest["variants"] = variants
    files = dict(manifest["files"])
    sizes = dict(manifest.get("sizes") or {})
    for entry in variants:
        files[entry["file"]] = sha256_of(model_dir / entry["file"])
        sizes[entry["file"]] = (model_dir / entry["file"]).stat().st_size
    manifest["files"], manifest["sizes"] = files, sizes
    atomic_write_text(model_dir / MANIFEST_FILE, json.dumps(manifest, separators=(",", ":")) + "\n")


def refresh_fp32_accuracy(model_dir: Path | str, manifest: Dict[str, Any], data_spec: Optional[str] = None,
                          trusted_data: bool = False) -> None:
    """After compaction the fp32 engines run the int8 weights dequantized: measure the fp32 variant
    again (onnxruntime through the runtime, which feeds the weights) and record it in the manifest."""
    from edge_runtime.session import InferenceSession

    model_dir = Path(model_dir)
    data_spec = data_spec or (manifest.get("source") or {}).get("data")
    shape = tuple(int(d) for d in manifest["input"]["shape"][1:])
    session = InferenceSession(model_dir, kernels="ort", threads=1)
    try:
        accuracy = accuracy_of(session, data_spec, shape, trusted_data)
    finally:
        session.close()
    if accuracy is None:
        return
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
    manifest["variants"] = [dict(entry, accuracy=accuracy, weights="int8 dequantized") if entry.get("name") == "fp32"
                            else entry for entry in manifest.get("variants", [])]
    atomic_write_text(model_dir / MANIFEST_FILE, json.dumps(manifest, separators=(",", ":")) + "\n")


def dense_level_accuracy(run_dir: Path | str, method: Optional[str]) -> Optional[float]:
    """The dense level's accuracy (a fraction) of a RUN_DIR: what ``--max-drop`` is measured against."""
    from compressor.run.run_dir import list_levels

    levels = list_levels(Path(run_dir))
    method = method or (levels[0].method if levels else None)
    dense = next((info for info in levels if info.method == method and info.level == 0), None)
    return dense.accuracy if dense is not None and dense.accuracy == dense.accuracy else None
