"""What a sweep measures and in which order: the models, the configurations, the reference.

A configuration is one model under one kernel choice and one thread count; it runs in its own
process on the device. The order interleaves the models (every model is measured under one setting
before any model moves to the next), so a slow drift — the Pi warming up, a background job — is
spread over all models instead of landing on the last ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks.device_output import strict_json
from benchmarks.errors import BenchError, ModelDirError
from edge_runtime.model_format import FORMAT, shipped_bytes

KERNELS = ("ort", "dense", "sparse", "auto", "ort-int8")
VARIANT_KERNELS = {"ort-int8": "int8"}  # a kernels choice that needs a variant (export --quantize int8)
REFERENCE_KERNELS = "ort"  # stock onnxruntime on the densest model: what speed-ups are measured against


@dataclass
class ModelEntry:
    """One model of the sweep: a local MODEL_DIR, or a model already deployed on the device(s)."""

    label: str                          # unique name in tables and plots
    local_dir: Optional[Path] = None    # set for a local MODEL_DIR (uploaded to scratch over SSH)
    deployed_name: Optional[str] = None  # set for `models/NAME/current` on the device
    sparsity: Optional[float] = None
    accuracy: Optional[float] = None
    size_bytes: Optional[int] = None
    method: Optional[str] = None
    level: Optional[int] = None
    family: str = ""  # the architecture (layer shapes): speed-ups compare models of one family only
    files: Dict[str, str] = field(default_factory=dict)  # manifest's {relative path: sha256}
    variants: Dict[str, Dict[str, object]] = field(default_factory=dict)  # manifest's variants by name
    def describe(self) -> Dict[str, object]:
        """The fields that go into results.json for every configuration of this model."""
        return {"label": self.label, "path": str(self.local_dir) if self.local_dir else None,
                "deployed_name": self.deployed_name, "sparsity": self.sparsity,
                "accuracy": self.accuracy, "size_bytes": self.size_bytes, "method": self.method,
                "level": self.level, "family": self.family}


@dataclass(frozen=True)
class Config:
    """One measurement: model (index into the sweep's models), kernels, threads."""

    model: int
    kernels: str
    threads: int
    reference_only: bool = False  # added only to give the speed-up a reference


def parse_manifest(text: str, where: str) -> Dict[str, object]:
    """A MODEL_DIR's manifest.json as a dict; ModelDirError when it is not one."""
    try:
        manifest = strict_json(text)  # NaN or Infinity: not a manifest edgeprune wrote
    except ValueError as error:
        raise ModelDirError(f"{where}: manifest.json is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{where}: manifest.json is not an edgeprune model manifest")
    return manifest


def entry_from_manifest(label: str, manifest: Dict[str, object]) -> ModelEntry:
    """The figures a report needs from a manifest (sparsity, accuracy, method, level)."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    layers = manifest.get("layers") if isinstance(manifest.get("layers"), list) else []
    # Structured pruning shrinks the layers, so its levels name their family (their run) themselves.
    family = source.get("family") if isinstance(source.get("family"), str) else \
        json.dumps([layer.get("shape") for layer in layers if isinstance(layer, dict)])
    return ModelEntry(label=label, sparsity=_number(manifest.get("sparsity")),
                      accuracy=_number(manifest.get("accuracy")), method=_text(source.get("method")),
                      level=_count(source.get("level")), family=family, files=dict(files),
                      variants=_variants(manifest))


def _variants(manifest: Dict[str, object]) -> Dict[str, Dict[str, object]]:
    """The manifest's ``variants`` by name (fp32, int8), each {file, engine, accuracy, size}."""
    entries = manifest.get("variants") if isinstance(manifest.get("variants"), list) else []
    return {str(e["name"]): {k: e.get(k) for k in ("file", "engine", "accuracy", "size")}
            for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)}


def read_model_dir(path: Path, label: Optional[str] = None) -> ModelEntry:
    """A local MODEL_DIR as a ModelEntry; ModelDirError when it is missing or broken."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a directory (give a MODEL_DIR written by `edgeprune export`)")
    manifest_path = path / "manifest.json"
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelDirError(f"{path}: cannot read manifest.json ({error})") from error
    manifest = parse_manifest(text, str(path))
    entry = entry_from_manifest(label or path.resolve().name, manifest)
    missing = [name for name in entry.files if not (path / name).is_file()]
    if missing:
        raise ModelDirError(f"{path}: files listed in manifest.json are missing: {', '.join(missing)}")
    entry.local_dir = path.resolve()
    entry.size_bytes = shipped_bytes(path, manifest)  # the one definition of a model's size
    return entry


def unique_labels(entries: Sequence["ModelEntry"]) -> List[str]:
    """Display names, unique: a repeated name (two ``model/`` dirs from different runs) gets the
    folder it came from (``model (runs/a)``), not a counter that says nothing about it."""
    counts: Dict[str, int] = {}
    for entry in entries:
        counts[entry.label] = counts.get(entry.label, 0) + 1
    labels, seen = [], set()
    for entry in entries:
        label = entry.label
        if counts[label] > 1 and entry.local_dir is not None:
            label = f"{label} ({_short_parent(entry.local_dir)})"
        while label in seen:  # still equal (same parent names): number what cannot be told apart
            label += "'"
        seen.add(label)
        labels.append(label)
    return labels


def _short_parent(path: Path) -> str:
    """The last two folders above ``path``, enough to tell runs apart without a long absolute path."""
    parents = Path(path).resolve().parent.parts[-2:]
    return "/".join(parents) or "/"


def parse_kernels(text: str) -> List[str]:
    """``ort,sparse`` → ["ort", "sparse"]; BenchError for an unknown kernel choice."""
    kernels = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown or not kernels:
        raise BenchError(f"--kernels: unknown {', '.join(unknown) or '(empty)'}; choose from {','.join(KERNELS)}")
    return list(dict.fromkeys(kernels))


MAX_THREADS = 1024  # the workstation cannot know a device's cores; no device this project targets has more


def parse_threads(text: str) -> List[int]:
    """``1,4`` → [1, 4]; BenchError unless every entry is a positive integer."""
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"--threads: expected positive integers like 1,4, got {text!r}") from None
    if not threads or min(threads) < 1:
        raise BenchError(f"--threads: expected positive integers like 1,4, got {text!r}")
    if max(threads) > MAX_THREADS:  # each device also refuses more than 4 threads per core
        raise BenchError(f"--threads: at most {MAX_THREADS}, got {max(threads)}")
    return list(dict.fromkeys(threads))


def reference_indices(models: Sequence[Dict[str, object]]) -> Dict[str, int]:
    """For each architecture (``family``), the index of its least sparse model: its dense reference.

    Models are dicts as ``ModelEntry.describe()`` gives them. The first given wins a tie; a model
    whose sparsity is unknown counts as fully sparse, so a known dense model wins.
    """
    references: Dict[str, int] = {}
    for i, model in enumerate(models):
        family = str(model.get("family") or "")
        sparsity = 1.0 if model.get("sparsity") is None else float(model["sparsity"])
        best = references.get(family)
        if best is None or sparsity < (1.0 if models[best].get("sparsity") is None else models[best]["sparsity"]):
            references[family] = i
    return references


def plan(models: Sequence[ModelEntry], kernels: Sequence[str], threads: Sequence[int]) -> List[Config]:
    """Every configuration, interleaved: thread count, then kernels, then the models in turn.

    When ``ort`` is not among the kernels, each architecture's reference model under ``ort`` is
    added first for each thread count, so that every row still gets its speed-up. A kernels choice
    that runs a variant (``ort-int8``) is planned only for the models whose manifest lists it (a
    deployed model's manifest is read on the device later: name its MODEL_DIR to compare variants).
    """
    refs = sorted(reference_indices([m.describe() for m in models]).values())
    configs: List[Config] = []
    for t in threads:
        if REFERENCE_KERNELS not in kernels:
            configs.extend(Config(ref, REFERENCE_KERNELS, t, reference_only=True) for ref in refs)
        for k in kernels:
            configs.extend(Config(m, k, t) for m in range(len(models))
                           if k not in VARIANT_KERNELS or VARIANT_KERNELS[k] in models[m].variants)
    return configs


def _number(value: object) -> Optional[float]:
    """A finite number from a manifest, else None (a manifest may come from a device)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value) if math.isfinite(float(value)) else None
    except OverflowError:
        return None


def _text(value: object) -> Optional[str]:
    return value if isinstance(value, str) else None


def _count(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
