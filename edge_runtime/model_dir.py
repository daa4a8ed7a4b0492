"""Reading a MODEL_DIR: manifest.json, sha256 checks, and tensors from weights.npz (no pickle).

Weights are handed out in the form a kernel computes with, whatever form they were stored in: a dense
float32 array, or a scipy CSR matrix of the weight viewed as ``[shape[0], rest]``.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import scipy.sparse as sp

from edge_runtime.errors import ModelDirError

FORMAT = "edgeprune-model"
SUPPORTED_VERSIONS = (1, 2)  # 2: several inputs / other dtypes (`inputs`, `output_specs`)
MANIFEST_FILE = "manifest.json"
REQUIRED_KEYS = ("format", "format_version", "input", "outputs", "graph", "tensors", "files")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> Dict[str, Any]:
    """Parse and sanity-check manifest.json; ModelDirError names what is wrong."""
    path = Path(model_dir) / MANIFEST_FILE
    if not Path(model_dir).is_dir():
        raise ModelDirError(f"{model_dir}: no such MODEL_DIR")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{model_dir}: no manifest.json (not a MODEL_DIR)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelDirError(f"{path}: corrupt manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{path}: not an {FORMAT} manifest")
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise ModelDirError(f"{path}: format version {manifest.get('format_version')!r} is not supported "
                            f"by this runtime (supports {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade it")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ModelDirError(f"{path}: manifest lacks {', '.join(missing)}")
    # manifest.json is not covered by a sha256: check the shapes every reader relies on, so a damaged
    # one is a ModelDirError rather than a KeyError/AttributeError deep inside loading.
    spec = manifest["input"]
    if not (isinstance(spec, dict) and {"name", "shape", "dtype"} <= set(spec)
            and isinstance(manifest["files"], dict) and isinstance(manifest["tensors"], dict)
            and isinstance(manifest["graph"], list) and isinstance(manifest["outputs"], list)):
        raise ModelDirError(f"{path}: malformed manifest (input, files, tensors, graph or outputs)")
    specs = manifest.get("inputs", [spec])  # format 2: every input; format 1 has only `input`
    if not (isinstance(specs, list) and specs and all(
            isinstance(s, dict) and {"name", "shape", "dtype"} <= set(s) and isinstance(s["shape"], list)
            for s in specs)):
        raise ModelDirError(f"{path}: malformed manifest (inputs)")
    return manifest


def verify_files(model_dir: Path, manifest: Dict[str, Any]) -> None:
    """Check every file the manifest lists against its sha256."""
    for name, expected in manifest["files"].items():
        path = Path(model_dir) / name
        if not path.is_file():
            raise ModelDirError(f"{model_dir}: {name} is missing")
        if sha256_of(path) != expected:
            raise ModelDirError(f"{model_dir}: {name} fails its sha256 check (corrupt or modified)")


class Weights:
    """The tensors of weights.npz, decoded on demand into dense arrays or CSR matrices."""

    def __init__(self, model_dir: Path, manifest: Dict[str, Any]) -> None:
        self.path = Path(model_dir) / "weights.npz"
        self.tensors: Dict[str, Dict[str, Any]] = manifest["tensors"]
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except FileNotFoundError:
            raise ModelDirError(f"{self.path} is missing") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ModelDirError(f"{self.path}: corrupt or truncated ({error})") from None

    def close(self) -> None:
        self._npz.close()

    def _member(self, key: str) -> np.ndarray:
        try:
            return self._npz[key]
        except KeyError:
            raise ModelDirError(f"{self.path}: member {key!r} is missing") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            raise ModelDirError(f"{self.path}: member {key!r} is corrupt ({error})") from None

    def info(self, name: str) -> Dict[str, Any]:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelDirError(f"manifest lists no tensor {name!r}") from None

    def is_sparse(self, name: str) -> bool:
        return self.info(name)["storage"] == "csr"

    def csr(self, name: str) -> sp.csr_matrix:
        """The tensor as a float32 CSR matrix ``[shape[0], rest]`` (int32 indices, as scipy computes)."""
        shape = self.info(name)["shape"]
        rows = int(shape[0])
        cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        if not self.is_sparse(name):
            return sp.csr_matrix(self.dense(name).reshape(rows, cols))
        data = self._member(f"{name}.data").astype(np.float32)
        indices = self._member(f"{name}.indices").astype(np.int32)
        indptr = self._member(f"{name}.indptr").astype(np.int32)
        if indptr.shape != (rows + 1,) or data.shape != indices.shape or int(indptr[-1]) != data.size:
            raise ModelDirError(f"{self.path}: CSR arrays of {name!r} are inconsistent")
        if indices.size and int(indices.max()) >= cols:
            raise ModelDirError(f"{self.path}: CSR column index out of range in {name!r}")
        return sp.csr_matrix((data, indices, indptr), shape=(rows, cols))

    def dense(self, name: str) -> np.ndarray:
        """The tensor as a dense array of its logical shape (float weights become float32)."""
        info = self.info(name)
        shape = tuple(int(d) for d in info["shape"])
        if self.is_sparse(name):
            return self.csr(name).toarray().reshape(shape)
        array = self._member(name)
        if array.shape != shape:
            raise ModelDirError(f"{self.path}: {name!r} has shape {array.shape}, manifest says {shape}")
        return array.astype(np.float32) if array.dtype == np.float16 else array

    def sample_inputs(self, manifest: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """Every smoke-test input by name: ``sample.inputs`` (several inputs), else the single ``sample.input``."""
        members = (manifest.get("sample") or {}).get("inputs")
        if isinstance(members, dict) and members:
            return {str(name): self._member(str(member)) for name, member in members.items()}
        return {manifest["input"]["name"]: self.sample(manifest)[0]}

    def sample(self, manifest: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, float]:
        """The manifest's smoke-test input, its expected output and the tolerance."""
        sample = manifest.get("sample") or {}
        if "input" not in sample or "output" not in sample:
            raise ModelDirError(f"{self.path.parent}: manifest has no sample")
        return self._member(sample["input"]), self._member(sample["output"]), float(sample.get("atol", 1e-4))
