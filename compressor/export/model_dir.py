"""Write a pruned PyTorch model as a MODEL_DIR: sparse ONNX + CSR weights + manifest.json.

The steps: export to ONNX (TorchScript exporter; any inputs, one chosen output), fold BatchNorm into
the convs, give tensors readable names, decide per weight whether CSR or dense storage is smaller,
write every tensor into an uncompressed weights.npz, point model.onnx's weights and other large
(sparse) initializers at those bytes as ONNX external data while small constants (shape, axes, index
tensors) stay inline in model.onnx, where onnxruntime's shape inference must read them; then check
the result with onnxruntime before moving it into place. See the MODEL_DIR section of ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from compressor.errors import ExportError
# The format's one owner is the device side: export writes exactly what the runtime reads.
from edge_runtime.model_format import (FORMAT, FORMAT_VERSION, FORMAT_VERSION_INPUTS,  # noqa: F401
                                       INLINE_BYTES, MANIFEST_FILE, ONNX_FILE, SAMPLE_INPUT, SAMPLE_OUTPUT,
                                       WEIGHTS_FILE, sha256_of, shipped_bytes)
from edge_runtime.safe_io import new_temp_dir_beside, replace_dir

TORCH_TOLERANCE = 1e-4
LAYOUTS = ("compact", "external")


@dataclass
class ExportResult:
    """What was written, and the figures worth printing."""

    out_dir: Path
    size_bytes: int
    dense_onnx_bytes: int
    sparsity: float
    max_abs_diff_torch: Optional[float]
    layers: List[Dict[str, Any]] = field(default_factory=list)
    picked: str = ""  # from a RUN_DIR: which level was exported and why (printed by the CLI)


def _prepare_out_dir(out_dir: Path, force: bool) -> Path:
    """A fresh temp dir beside ``out_dir``, which may be missing, empty, or (``force``) a MODEL_DIR.

    ``--force`` replaces only what export itself writes: a folder holding anything else (a RUN_DIR, a
    level's checkpoints, a home folder) is refused whatever the flags, since replacing it deletes it.
    """
    if out_dir.is_symlink():
        raise ExportError(f"{out_dir} is a symbolic link; give the folder it points to")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not out_dir.is_dir() or not (out_dir / MANIFEST_FILE).is_file():
            raise ExportError(f"{out_dir} exists and is not a MODEL_DIR (no {MANIFEST_FILE}); --force replaces "
                              "only a MODEL_DIR or an empty folder: choose another --out")
        if not force:
            raise ExportError(f"{out_dir} exists and is not empty (use --force to replace it)")
    return new_temp_dir_beside(out_dir)


def _plan_storage(tensors: Dict[str, np.ndarray], weights: Dict[str, Tuple[str, str]],
                  values_dtype: np.dtype) -> Dict[str, Dict[str, Any]]:
    """Per tensor: how it is stored (csr / dense) and in which dtype."""
    from compressor.export.onnx_sparse import sparse_is_smaller

    plan = {}
    for name, array in tensors.items():
        is_weight = name in weights and array.dtype == np.float32 and array.ndim >= 2
        dtype = values_dtype if is_weight else array.dtype
        sparse = is_weight and sparse_is_smaller(array, dtype)
        plan[name] = {"storage": "csr" if sparse else "dense", "dtype": str(np.dtype(dtype)),
                      "shape": list(array.shape), "onnx": "external" if is_weight or not _inline(array) else "inline"}
    return plan


def _inline(array: np.ndarray) -> bool:
    """Whether a non-weight tensor stays inside model.onnx: onnxruntime's shape inference reads the
    values of Reshape/Unsqueeze/Slice/Expand... inputs and cannot read them from external data."""
    return array.nbytes <= INLINE_BYTES or not np.issubdtype(array.dtype, np.floating)


def _encode(tensors: Dict[str, np.ndarray], storage: Dict[str, Dict[str, Any]]
            ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(weights.npz members, int64 coo indices of each CSR tensor for model.onnx)."""
    from compressor.export.onnx_sparse import encode_csr

    arrays: Dict[str, np.ndarray] = {}
    coo: Dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        entry = storage[name]
        if entry["storage"] == "csr":
            csr = encode_csr(array, np.dtype(entry["dtype"]))
            arrays.update(csr.arrays(name))
            coo[name] = csr.coo
        else:
            arrays[name] = array.astype(entry["dtype"])
    return arrays, coo


def _build_onnx(template: Any, arrays: Dict[str, np.ndarray], coo: Dict[str, np.ndarray],
                storage: Dict[str, Dict[str, Any]], offsets: Optional[Dict[str, Tuple[int, int]]]) -> Any:
    """model.onnx for these arrays: raw data in memory (offsets None) or external refs into weights.npz.

    Sparse initializers' int64 indices are always stored inside model.onnx: onnxruntime up to at least
    1.22 rejects external sparse indices ("Sparse indices int64 data size does not match expected").

    A float16 weight becomes an initializer ``NAME__fp16`` plus a Cast to float32 named ``NAME``, so the
    graph's nodes are unchanged; onnxruntime folds the Cast once at load.
    """
    import onnx
    from onnx import helper, numpy_helper

    def tensor(key: str, name: str, inline: bool = False) -> onnx.TensorProto:
        array = arrays[key]
        if offsets is None or inline:
            return numpy_helper.from_array(array, name)
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        offset, length = offsets[key]
        for key_, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
            entry = proto.external_data.add()
            entry.key, entry.value = key_, str(value)
        proto.data_location = onnx.TensorProto.EXTERNAL
        return proto

    model = onnx.ModelProto()
    model.CopyFrom(template)
    graph = model.graph
    del graph.initializer[:]
    casts = []
    for name, entry in storage.items():
        stored_name = name
        if entry["dtype"] == "float16":
            stored_name = f"{name}__fp16"
            casts.append(helper.make_node("Cast", [stored_name], [name], name=f"{name}/cast",
                                          to=onnx.TensorProto.FLOAT))
        if entry["storage"] == "csr":
            values = tensor(f"{name}.data", stored_name)
            indices = numpy_helper.from_array(coo[name], f"{stored_name}.coo")
            graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, entry["shape"]))
        else:
            graph.initializer.append(tensor(name, stored_name, entry.get("onnx") == "inline"))
    if casts:
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return model


def _run_onnx(model_or_path: Any, feed: Dict[str, np.ndarray]) -> np.ndarray:
    """The (single) output of model.onnx, in memory or on disk, for ``feed``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    try:
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feed.items() if k in wanted})[0]
    except Exception as error:  # onnxruntime's own exceptions are not a stable public type
        raise ExportError(f"onnxruntime cannot run the exported model: {error}") from error


def _torch_output(model: Any, feed: Dict[str, np.ndarray], positional: bool, output: Optional[str]) -> np.ndarray:
    import torch

    from compressor.train.batches import pick_output

    tensors = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in feed.items()}
    with torch.no_grad():
        out = model(*tensors.values()) if positional else model(**tensors)
    return pick_output(out, output)[1].numpy()


def _example_feed(model: Any, sample: Any, input_shape: Tuple[int, ...], seed: int) -> Tuple[Dict[str, np.ndarray], bool]:
    """``({input name: array}, positional)`` from a sample (an array/tensor, a tuple of them, or a dict
    of keyword arguments; batch first) or, with none, one seeded float32 example of ``input_shape``."""
    import torch

    from compressor.train.batches import named_inputs

    if sample is None:
        if not input_shape:
            raise ExportError("the model declares no input_shape; pass one (e.g. --input-shape 3,32,32) "
                              "or example inputs (--sample inputs.npz)")
        sample = np.random.default_rng(seed).standard_normal((1, *input_shape)).astype(np.float32)
    positional = not isinstance(sample, dict)
    as_tensor = lambda value: torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if isinstance(sample, dict):
        structure: Any = {str(k): as_tensor(v) for k, v in sample.items()}
    elif isinstance(sample, (tuple, list)):
        structure = tuple(as_tensor(v) for v in sample)
    else:
        structure = as_tensor(sample)
    feed = {}
    for name, tensor in named_inputs(model, structure).items():
        array = tensor.detach().cpu().numpy()
        array = array.astype(np.float32) if array.dtype == np.float64 else array  # the model runs in float32
        if array.ndim == 0 or array.shape[0] < 1:
            raise ExportError(f"example input {name!r} has shape {list(array.shape)}; inputs are batch first")
        feed[name] = np.ascontiguousarray(array)
    batches = {array.shape[0] for array in feed.values()}
    if len(batches) != 1:
        raise ExportError(f"example inputs disagree on the batch size: {sorted(batches)}")
    return feed, positional


def _batch_of(feed: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
    """The feed with its first example repeated ``size`` times (a second batch size to check)."""
    return {name: np.ascontiguousarray(np.repeat(array[:1], size, axis=0)) for name, array in feed.items()}


def export_model(model: Any, out_dir: Path | str, *, input_shape: Optional[Sequence[int]] = None,
                 values_dtype: str = "float32", sample: Any = None, output: Optional[str] = None,
                 accuracy: Optional[float] = None, sparsity: Optional[float] = None,
                 source: Optional[Dict[str, Any]] = None, force: bool = False, seed: int = 0,
                 layout: str = "compact") -> ExportResult:
    """Export a (pruned) PyTorch module to ``out_dir`` as a MODEL_DIR and verify it with onnxruntime.

    ``layout``: ``compact`` (format 3, compressor/export/compact.py: each weight once, in ``values_dtype``) or
    ``external`` (formats 1-2: model.onnx reads its weights from weights.npz as external data).
    ``sample`` (batch first) is the example the graph is traced with and the manifest's smoke test: an
    array/tensor (one input), a tuple (positional inputs) or a dict (keyword inputs: ``input_ids``,
    ``attention_mask``; any dtype). Without one, one seeded float32 example of ``input_shape`` (default:
    ``model.input_shape``, one example's shape without the batch axis). ``output`` picks the model's
    output to export (a dict/ModelOutput key or tuple position; default ``logits`` or the first tensor).
    ``accuracy``/``sparsity`` are the level's figures (sparsity defaults to the exported weights' own).
    Raises ExportError for anything the user can fix; nothing is written to ``out_dir`` unless it all works.
    """
    from compressor.export import onnx_graph
    from compressor.export.onnx_npz import member_offsets, write_npz

    if values_dtype not in ("float32", "float16"):
        raise ExportError(f"values dtype must be float32 or float16, got {values_dtype!r}")
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    compact_values, values_dtype = values_dtype, ("float32" if layout == "compact" else values_dtype)
    out_dir = Path(out_dir)
    shape = tuple(input_shape or getattr(model, "input_shape", None) or ())
    model = model.float().cpu().eval()  # (in place, as torch does for modules)
    feed, positional = _example_feed(model, sample, shape, seed)
    if sample is None or isinstance(sample, np.ndarray) and shape:
        first = next(iter(feed.values()))
        if tuple(first.shape[1:]) != shape:
            raise ExportError(f"sample shape {first.shape[1:]} does not match input shape {shape}")
    temp = _prepare_out_dir(out_dir, force)
    try:
        # Traced at batch 2: a batch of 1 lets the tracer bake size-1 broadcasts into the graph.
        onnx_model, output_name = onnx_graph.torch_to_onnx(model, _torch_feed(_batch_of(feed, 2)), output,
                                                           positional)
        graph = onnx_model.graph
        onnx_graph.constants_to_initializers(graph)
        onnx_graph.inline_identities(graph)
        onnx_graph.fold_batchnorm(graph)
        onnx_graph.rename_tensors(graph)
        # the graph's inputs (the exporter drops ones the output ignores); PyTorch still gets them all
        graph_feed = {name: feed[name] for name in _graph_inputs(graph, feed)}
        tensors = onnx_graph.initializers(graph)
        weights = onnx_graph.weight_inputs(graph)
        storage = _plan_storage(tensors, weights, np.dtype(values_dtype))
        arrays, coo = _encode(tensors, storage)
        dense_onnx_bytes = onnx_model.ByteSize()

        in_memory = _build_onnx(onnx_model, arrays, coo, storage, None)
        expected = _run_onnx(in_memory, feed)
        torch_diff = None
        if values_dtype == "float32":
            torch_diff = 0.0
            for check in (feed, _batch_of(feed, 3)):  # the batch axis really is free
                got = expected if check is feed else _run_onnx(in_memory, check)
                torch_diff = max(torch_diff, _max_diff(got, _torch_output(model, check, positional, output)))
            if torch_diff > TORCH_TOLERANCE:
                raise ExportError(f"exported model differs from PyTorch by {torch_diff:.3g} (> {TORCH_TOLERANCE})")

        sample_members = {name: SAMPLE_INPUT if i == 0 else f"{SAMPLE_INPUT}.{i}" for i, name in enumerate(graph_feed)}
        arrays.update({sample_members[name]: array for name, array in graph_feed.items()})
        arrays[SAMPLE_OUTPUT] = expected
        write_npz(temp / WEIGHTS_FILE, arrays)
        final = _build_onnx(onnx_model, arrays, coo, storage, member_offsets(temp / WEIGHTS_FILE))
        (temp / ONNX_FILE).write_bytes(final.SerializeToString())
        _validate(temp, graph_feed, expected)

        layers = _layer_table(tensors, weights, storage)
        total = sum(layer["size"] for layer in layers)
        own_sparsity = sum(layer["size"] * layer["sparsity"] for layer in layers) / max(total, 1)
        input_specs = [{"name": name, "shape": ["batch", *array.shape[1:]], "dtype": str(array.dtype)}
                       for name, array in graph_feed.items()]
        output_specs = [{"name": output_name, "shape": ["batch", *expected.shape[1:]], "dtype": str(expected.dtype)}]
        simple = len(input_specs) == 1 and input_specs[0]["dtype"] == "float32" and expected.dtype == np.float32
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION if simple else FORMAT_VERSION_INPUTS,
            "input": input_specs[0],
            "inputs": input_specs,
            "outputs": [output_name],
            "output_specs": output_specs,
            "graph": onnx_graph.node_list(graph),
            "tensors": storage,
            "layers": layers,
            "accuracy": accuracy,
            "sparsity": float(sparsity if sparsity is not None else own_sparsity),
            "values_dtype": values_dtype,
            "opset": onnx_graph.OPSET,
            "files": {name: sha256_of(temp / name) for name in (ONNX_FILE, WEIGHTS_FILE)},
            "sizes": {ONNX_FILE: (temp / ONNX_FILE).stat().st_size,
                      WEIGHTS_FILE: (temp / WEIGHTS_FILE).stat().st_size,
                      "dense_onnx": dense_onnx_bytes},
            "sample": {"file": WEIGHTS_FILE, "input": SAMPLE_INPUT, "inputs": sample_members,
                       "output": SAMPLE_OUTPUT, "atol": 1e-4 if values_dtype == "float32" else 1e-2},
            "source": source or {},
        }
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
        if layout == "compact":  # checked as written above, then rewritten (and checked) before it lands
            from compressor.export.compact import compact_model_dir

            manifest = compact_model_dir(temp, compact_values)
            layers = manifest["layers"]
        size = shipped_bytes(temp, manifest)  # the one definition of a model's size
        replace_dir(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ExportResult(out_dir, size, dense_onnx_bytes, manifest["sparsity"], torch_diff, layers)


def check_exportable(model: Any, sample: Any, output: Optional[str] = None) -> None:
    """Export a copy of ``model`` to ONNX in memory on ``sample`` (batch first: a tensor, tuple or dict),
    as :func:`export_model` will (no files, no onnxruntime); ExportError when torch cannot. A run checks
    this before training, so a model that can never be exported is known before training is paid for."""
    import copy

    from compressor.export import onnx_graph

    clone = copy.deepcopy(model).float().cpu().eval()
    feed, positional = _example_feed(clone, sample, (), 0)
    onnx_graph.torch_to_onnx(clone, _torch_feed(_batch_of(feed, 2)), output, positional)


def _torch_feed(feed: Dict[str, np.ndarray]) -> Dict[str, Any]:
    import torch

    return {name: torch.from_numpy(array) for name, array in feed.items()}


def _max_diff(got: np.ndarray, expected: np.ndarray) -> float:
    if got.shape != expected.shape:
        raise ExportError(f"exported model gives shape {list(got.shape)}, PyTorch {list(expected.shape)}")
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))


def _graph_inputs(graph: Any, feed: Dict[str, np.ndarray]) -> List[str]:
    """The graph's inputs, in order; the exporter drops inputs the output does not depend on."""
    init_names = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in init_names]
    unknown = [name for name in names if name not in feed]
    if unknown:
        raise ExportError(f"the exported graph wants inputs {', '.join(unknown)} that the example does not give")
    if not names:
        raise ExportError("the exported graph has no input: the chosen output does not depend on the inputs")
    return names


def _validate(model_dir: Path, feed: Dict[str, np.ndarray], expected: np.ndarray) -> None:
    """Check the written files: the ONNX checker on the model with its external data loaded into memory
    (it cannot follow external sparse tensors by itself), then onnxruntime on the files as written."""
    import onnx

    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    loaded = onnx.load(str(model_dir / ONNX_FILE), load_external_data=False)
    graph = loaded.graph
    stored = [*graph.initializer, *(t for s in graph.sparse_initializer for t in (s.values, s.indices))]
    for tensor in stored:  # read each tensor's bytes at its offset: this also proves the offsets right
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(model_dir))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    try:
        onnx.checker.check_model(loaded)  # full_check: shape inference types sparse initializers wrongly
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported ONNX model is invalid: {error}") from error
    got = _run_onnx(str(model_dir / ONNX_FILE), feed)
    if not np.array_equal(got, expected, equal_nan=True):
        raise ExportError("model.onnx with external weights gives different outputs than in memory")


def _layer_table(tensors: Dict[str, np.ndarray], weights: Dict[str, Tuple[str, str]],
                 storage: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    table = []
    for name, (layer, op) in weights.items():
        array = tensors[name]
        nnz = int(np.count_nonzero(array))
        table.append({"name": layer, "weight": name, "op": op, "shape": list(array.shape),
                      "size": int(array.size), "nnz": nnz, "sparsity": 1.0 - nnz / max(array.size, 1),
                      "storage": storage[name]["storage"]})
    return table
