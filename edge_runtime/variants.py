"""A MODEL_DIR's variants beyond its fp32 model (manifest ``variants``), and the engines that run them.

``edgeprune export --quantize int8`` adds ``model.int8.onnx`` and a ``variants`` list:
``[{"name": "fp32", "file": "model.onnx", "engine": "ort", "accuracy", "size"},
{"name": "int8", "file": "model.int8.onnx", "engine": "ort-int8", "accuracy", "size", ...}]``.
A reader that does not know ``variants`` still loads the fp32 model; this module is the one place the
runtime learns about the others. An int8 variant runs in onnxruntime (its quantized kernels); the
native sparse kernels stay fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from edge_runtime.errors import ModelDirError

ENGINES = {"ort-int8": "int8"}   # kernels= choice -> the variant it runs


def listed(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The manifest's well-formed variant entries whose file is hashed in ``files`` (a plain name in
    MODEL_DIR): an entry naming anything else is ignored rather than trusted."""
    entries = manifest.get("variants")
    if not isinstance(entries, list):
        return []
    files = manifest.get("files") or {}
    return [entry for entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("file"), str)
            and entry["file"] in files and "/" not in entry["file"] and "\\" not in entry["file"]
            and not entry["file"].startswith(".")]


def find(manifest: Dict[str, Any], engine: str) -> Optional[Dict[str, Any]]:
    """The variant that ``engine`` (a kernels= choice) runs, or None when the MODEL_DIR lacks it."""
    name = ENGINES.get(engine)
    return next((entry for entry in listed(manifest) if entry["name"] == name), None)


def require(model_dir: Path, manifest: Dict[str, Any], engine: str) -> Dict[str, Any]:
    """Like :func:`find`, but a MODEL_DIR without that variant is a ModelDirError that says how to get one."""
    entry = find(manifest, engine)
    if entry is None:
        raise ModelDirError(f"{model_dir} has no {ENGINES[engine]} variant for kernels={engine!r} "
                            f"(export it with `edgeprune export ... --quantize {ENGINES[engine]}`)")
    return entry


def describe(manifest: Dict[str, Any], engine: str) -> Dict[str, Any]:
    """``{name, accuracy, size}`` of the variant an engine runs ("native"/"ort": the fp32 model)."""
    entry = find(manifest, engine) if engine in ENGINES else next(
        (e for e in listed(manifest) if e["name"] == "fp32"), None)
    if entry is None:
        return {"name": "fp32", "accuracy": manifest.get("accuracy"), "size": None}
    return {"name": entry["name"], "accuracy": entry.get("accuracy"), "size": entry.get("size")}


def expected_sample(manifest: Dict[str, Any], engine: str) -> Optional[Tuple[np.ndarray, float]]:
    """``(output, atol)`` that ``engine``'s variant gives on the MODEL_DIR's sample input, when the
    export recorded it (an int8 output differs from the fp32 sample by the quantization error)."""
    entry = find(manifest, engine) if engine in ENGINES else None
    sample = entry.get("sample") if entry else None
    try:
        output = np.asarray(sample["output"], dtype=np.float64).reshape([int(d) for d in sample["shape"]])
        return output, float(sample["atol"])
    except (TypeError, KeyError, ValueError):
        return None


def open_session(model_dir: Path, manifest: Dict[str, Any], engine: str, threads: int, weights: Any) -> Any:
    """An onnxruntime session on the variant ``engine`` runs (ModelDirError when it cannot load). A
    compact MODEL_DIR's variant file holds placeholders for its int8 weights: they are fed from
    ``weights`` (model_dir.Weights), the one stored copy the fp32 engines dequantize."""
    from edge_runtime.onnx_check import check_variant
    from edge_runtime.ort_session import open_ort

    entry = require(model_dir, manifest, engine)
    feeds = check_variant(model_dir, manifest, entry, weights)  # before onnxruntime follows anything in the file
    arrays = {}
    for name, feed in feeds.items():
        values = weights.quantized(feed["tensor"])
        arrays[name] = np.ascontiguousarray(values.T if feed.get("transpose") else values)
    files = getattr(weights, "files", None)  # the bytes check_variant just parsed: onnxruntime parses the same
    return open_ort(Path(model_dir) / entry["file"], threads, arrays, log_level=3,
                    data=files.read(entry["file"]) if files is not None else None)


def choose(measured: Dict[str, float], margin: float) -> Dict[str, Any]:
    """The engine to keep from median milliseconds per engine: the fastest onnxruntime engine (fp32 or
    a variant) is the baseline, and native must beat it by ``margin`` (see plan.NATIVE_MARGIN)."""
    stock = {engine: ms for engine, ms in measured.items() if engine != "native" and ms is not None}
    if not stock:
        return {"engine": "native"}
    baseline = min(stock, key=stock.get)
    native = measured.get("native")
    if native is not None and native * margin <= stock[baseline]:
        return {"engine": "native"}
    if native is None:
        return {"engine": baseline}
    return {"engine": baseline, "reason": f"native {native:.3f} ms is not {margin - 1:.0%} faster than "
                                          f"{baseline} {stock[baseline]:.3f} ms"}
