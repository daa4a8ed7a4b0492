"""Reading a MODEL_DIR: manifest.json, sha256 checks, and tensors from weights.npz (no pickle).

Weights are handed out in the form a kernel computes with, whatever form they were stored in: a dense
float32 array, or a scipy CSR matrix of the weight viewed as ``[shape[0], rest]``. Every array is
checked before scipy or a kernel sees it: scipy trusts CSR arrays, and a negative column index or a
decreasing ``indptr`` makes its C++ code read and write outside the arrays (a SIGSEGV at best).

The format itself (names, versions, manifest schema, sha256) is defined in ``model_format``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import scipy.sparse as sp

try:  # scipy's own CSR -> dense loop, without building (and re-checking) a csr_matrix per tensor
    from scipy.sparse._sparsetools import csr_todense as _csr_todense
except ImportError:  # pragma: no cover - a scipy that moved it: the public (slower) path below
    _csr_todense = None

from edge_runtime.errors import ModelDirError
from edge_runtime.model_format import (FORMAT, MANIFEST_FILE, SUPPORTED_VERSIONS, WEIGHTS_FILE, inside,
                                       listed_files, max_model_bytes, open_regular, read_manifest, sha256_of,
                                       verify_files)
from edge_runtime.npz_reader import NpzArchive

__all__ = ["FORMAT", "MANIFEST_FILE", "SUPPORTED_VERSIONS", "read_manifest", "sha256_of", "verify_files",
           "check_csr", "FolderFiles", "Weights", "read_sample"]

_INT32_MAX = np.iinfo(np.int32).max
_DTYPES: Dict[str, np.dtype] = {}  # manifest dtype name -> numpy dtype, built once (hundreds of tensors per load)


def _dtype(name: str) -> np.dtype:
    if name not in _DTYPES:
        _DTYPES[name] = np.dtype(name)
    return _DTYPES[name]


def csr_to_dense(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``[rows, cols]`` float32 from CSR arrays that ``check_csr`` validated (float32 / int32 / int32).
    scipy's own loop, called once: a csr_matrix would re-scan the indices for their dtype on every tensor."""
    if _csr_todense is None or data.dtype != np.float32 or indices.dtype != np.int32 or indptr.dtype != np.int32:
        return sp.csr_matrix((data, indices, indptr), shape=(rows, cols)).toarray()
    out = np.zeros((rows, cols), dtype=np.float32)
    _csr_todense(rows, cols, indptr, indices, data, out)
    return out


class FolderFiles:
    """The files of one load of a MODEL_DIR, each read once, and checked against its sha256 once.

    Every reader of the load (the npz reader, the model.onnx checks, onnxruntime itself) gets these
    bytes: a file is neither hashed and then read again (twice the I/O, and a window in which it could
    change between the check and the use) nor read once per reader. The bytes are immutable, so the
    arrays viewed in them are read-only: whatever is fed from them cannot be altered in place.
    """

    def __init__(self, model_dir: Path, manifest: Mapping[str, Any], verify: bool = True) -> None:
        self.model_dir = Path(model_dir)
        self.listed = listed_files(manifest, str(self.model_dir / MANIFEST_FILE))
        self.verify = verify
        self._bytes: Dict[str, bytes] = {}
        self._hashing: Optional[threading.Thread] = None
        self._hashed: Dict[str, bool] = {}  # name -> passed, from the background thread

    def read(self, name: str) -> bytes:
        """The file's bytes (bounded, a regular file inside MODEL_DIR), checked on first read; after
        ``verify_all(background=True)``, checked once ``confirm()`` returns."""
        if name not in self._bytes:
            self._bytes[name] = self._read_bounded(name)
            self._check_sha256(name)
        return self._bytes[name]

    def _read_bounded(self, name: str) -> bytes:
        path = inside(self.model_dir, name)
        # an npz holds the tensors plus its zip and npy headers: allow those beyond the tensor bound
        limit = 2 * max_model_bytes() + (1 << 20)
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise ModelDirError(f"{path}: larger than {limit:,} bytes (EDGEPRUNE_MAX_MODEL_BYTES)")
            data = handle.read(size + 1)
        if len(data) != size:
            raise ModelDirError(f"{path}: changed size while it was read")
        return data

    def _sha256_fails(self, name: str, data: bytes) -> bool:
        return self.verify and hashlib.sha256(data).hexdigest() != self.listed.get(name)

    def _check_sha256(self, name: str) -> None:
        if self._sha256_fails(name, self._bytes[name]):
            raise self._sha256_error(name)

    def _sha256_error(self, name: str) -> ModelDirError:
        return ModelDirError(f"{self.model_dir}: {name} fails its sha256 check (corrupt or modified)")

    def verify_all(self, background: bool = False) -> None:
        """Read and check every file the manifest lists (a bad file fails the load, used or not).

        ``background``: the files are read now and hashed in a thread (hashlib releases the GIL) while
        the load checks what the bytes say; ``confirm()`` waits for the hashes, and must return before
        any engine computes with the bytes. A file that fails its sha256 is still the error a load
        reports first: the session confirms before it reports any other check's failure."""
        if not (background and self.verify):
            for name in self.listed:
                self.read(name)
            return
        try:
            for name in self.listed:
                if name not in self._bytes:
                    self._bytes[name] = self._read_bounded(name)
        except ModelDirError:  # a file missing or too big: the files read before it are checked first
            for name in list(self._bytes):
                self._check_sha256(name)
            raise
        files = [(name, self._bytes[name]) for name in self.listed]  # the thread's own references

        def hash_all() -> None:
            for name, data in files:
                self._hashed[name] = not self._sha256_fails(name, data)
        self._hashing = threading.Thread(target=hash_all, name="edge-runtime-sha256", daemon=True)
        self._hashing.start()

    def confirm(self) -> None:
        """Wait for the background hashes (``verify_all(background=True)``); ModelDirError naming the
        first listed file that fails its sha256 (also after ``release``)."""
        self._finish_hashing()
        failed = [name for name in self.listed if self._hashed.get(name) is False]
        if failed:
            raise self._sha256_error(failed[0])

    def _finish_hashing(self) -> None:
        """Join the hashing thread; a file it did not get to (it failed) is hashed here."""
        if self._hashing is None:
            return
        self._hashing.join()
        self._hashing = None
        for name in self.listed:
            if name not in self._hashed and name in self._bytes:
                self._hashed[name] = not self._sha256_fails(name, self._bytes[name])

    def forget(self, name: str) -> None:
        """Drop one file's bytes (arrays viewed in them keep what they need alive)."""
        self._bytes.pop(name, None)

    def release(self) -> None:
        self._finish_hashing()  # never leave a thread hashing bytes nobody will use; confirm still answers
        self._bytes.clear()


def check_csr(where: str, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
              rows: int, cols: int, int8: bool = False,
              int32_indices: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate CSR arrays completely (vectorised) and return them as float32 (int8 with ``int8``) /
    int32 / int32 (values and indices are the arrays given when already of that dtype; indices as
    given with ``int32_indices=False``, for delta indices that ``undelta`` decodes next).

    Checked: 1-D arrays; float data (int8 for a quantized tensor); integral index arrays; as many indices as values; ``indptr`` has
    ``rows + 1`` entries, starts at 0, never decreases and ends at the number of values; every column
    index is in ``[0, cols)``; everything fits the int32 indices scipy computes with.
    """
    def bad(what: str) -> ModelDirError:
        return ModelDirError(f"{where}: invalid CSR arrays ({what})")

    if data.ndim != 1 or indices.ndim != 1 or indptr.ndim != 1:
        raise bad("data, indices and indptr must be 1-D")
    values_ok = data.dtype == np.int8 if int8 else data.dtype.kind == "f"
    if not values_ok or indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise bad(f"dtypes {data.dtype}, {indices.dtype}, {indptr.dtype}: values must be "
                  f"{'int8' if int8 else 'float'}, indices integers")
    if max(rows, cols, data.size) > _INT32_MAX:
        raise bad("too large for int32 indices")
    if indptr.size != rows + 1:
        raise bad(f"indptr has {indptr.size} entries, expected rows + 1 = {rows + 1}")
    if indices.size != data.size:
        raise bad(f"{indices.size} column indices for {data.size} values")
    if indptr.dtype == np.uint64 and indptr.size and int(indptr.max()) > _INT32_MAX:
        raise bad("indptr entry out of range")
    pointers = indptr.astype(np.int64)
    if int(pointers[0]) != 0 or int(pointers[-1]) != data.size:
        raise bad(f"indptr must start at 0 and end at {data.size}")
    if np.any(pointers[1:] < pointers[:-1]):
        raise bad("indptr decreases")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= cols):
        raise bad(f"a column index is outside [0, {cols})")
    # no copy where the dtype is already right: read-only views of the checked bytes (Weights.csr copies
    # them for the native kernels, which sort indices in place)
    return ((data if int8 else data.astype(np.float32, copy=False)),
            indices.astype(np.int32, copy=False) if int32_indices else indices, pointers.astype(np.int32))


def undelta(where: str, deltas: np.ndarray, indptr: np.ndarray, cols: int) -> np.ndarray:
    """Column indices from format 3's uint8 gaps (``"indices": "delta"``: per row, the first entry's
    column, then the distance from the previous entry), after the arrays' structure was checked: each
    gap after a row's first at least 1 (columns strictly increase, so no duplicate) and every column
    in ``[0, cols)``. Returns int32."""
    if deltas.dtype != np.uint8:
        raise ModelDirError(f"{where}: invalid CSR arrays (delta indices must be uint8, not {deltas.dtype})")
    if deltas.size == 0:
        return np.zeros(0, np.int32)
    counts = np.diff(indptr)
    starts = indptr[:-1][counts > 0]  # each non-empty row's first entry: its gap is the column itself
    if deltas.size - np.count_nonzero(deltas) != np.count_nonzero(deltas[starts] == 0):  # zeros: no temporary
        raise ModelDirError(f"{where}: invalid CSR arrays (a delta of 0 repeats a column)")
    wide = np.int32 if deltas.size * 255 <= _INT32_MAX else np.int64
    gaps = deltas.astype(wide)  # the one array allocated here: the result is summed in place in it
    last = np.add.reduceat(gaps, starts)  # each row's last column: gaps are >= 0, so its largest
    if int(last.max()) >= cols:
        raise ModelDirError(f"{where}: invalid CSR arrays (a column index is outside [0, {cols}))")
    # one running sum over every row: at each row's start, take back the previous row's last column
    gaps[starts[1:]] -= last[:-1]
    return np.cumsum(gaps, out=gaps).astype(np.int32, copy=False)


class Weights:
    """The tensors of weights.npz, decoded on demand into dense arrays or CSR matrices."""

    def __init__(self, model_dir: Path, manifest: Dict[str, Any], files: Optional[FolderFiles] = None) -> None:
        self.path = Path(model_dir) / WEIGHTS_FILE
        self.tensors: Dict[str, Dict[str, Any]] = manifest["tensors"]
        self.files = files
        self.archive = NpzArchive(self.path, max_model_bytes(), files.read(WEIGHTS_FILE) if files else None)
        # each stored tensor validated once per load: check_all, the kernels and onnxruntime's feeds share it
        self._checked: Dict[str, Any] = {}
        self._decoding: Optional[threading.Thread] = None
        self._decoded_event = threading.Event()
        self._decoded: Dict[str, Any] = {}  # CSR arrays (or the error) from decode_sparse_ahead's thread
        self._dense_ahead: Dict[str, np.ndarray] = {}  # and the dense forms onnxruntime is fed

    def decode_sparse_ahead(self, dense_feeds: bool = False) -> None:
        """Validate and decode every CSR tensor in a thread, while the load checks everything else: the
        work is numpy's (delta sums, casts, bounds), which runs without the GIL. Each tensor's result, or
        its error, is taken where the load first asks for it, so what fails, and when, is unchanged.
        ``dense_feeds`` (onnxruntime will run the model): the thread then also makes the float CSR
        tensors onnxruntime is fed dense, for ``fed``. Only for bytes in memory (a file's reads would
        share its offset with this thread)."""
        if self.files is None or self._decoding is not None:
            return
        names = [name for name, info in self.tensors.items() if info["storage"] == "csr"]
        fed = [name for name in names if self.tensors[name].get("onnx") == "fed" and not self.is_int8(name)]
        self._decoded_event = threading.Event()

        def decode() -> None:
            results: Dict[str, Any] = {}
            try:
                for name in names:
                    try:
                        results[name] = self._read_csr(name)
                    except Exception as error:  # noqa: BLE001  (raised again where the load reads the tensor)
                        results[name] = error
            finally:
                self._decoded.update(results)
                self._decoded_event.set()
            for name in fed if dense_feeds else ():
                arrays = results.get(name)
                try:
                    if isinstance(arrays, tuple):  # validated: safe for scipy's loop
                        shape = tuple(int(d) for d in self.tensors[name]["shape"])
                        self._dense_ahead[name] = csr_to_dense(*arrays, *self.matrix_shape(name)).reshape(shape)
                except Exception:  # noqa: BLE001  (only ahead of time: ``dense`` makes it again, and says why)
                    return
        self._decoding = threading.Thread(target=decode, name="edge-runtime-csr", daemon=True)
        self._decoding.start()

    def _join_decoding(self) -> None:
        if self._decoding is not None:
            self._decoding.join()
            self._decoding = None

    def close(self) -> None:
        self._join_decoding()
        self._decoded.clear()
        self._dense_ahead.clear()
        self.archive.close()
        self._checked.clear()
        if self.files is not None:
            self.files.release()

    def _member(self, key: str) -> np.ndarray:
        return self.archive.read(key)

    def info(self, name: str) -> Dict[str, Any]:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelDirError(f"manifest lists no tensor {name!r}") from None

    def is_sparse(self, name: str) -> bool:
        return self.info(name)["storage"] == "csr"

    def matrix_shape(self, name: str) -> Tuple[int, int]:
        """The tensor viewed as ``[shape[0], rest]``."""
        shape = [int(d) for d in self.info(name)["shape"]] or [1]
        return shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1

    def is_int8(self, name: str) -> bool:
        """A format-3 weight stored as int8 values with a float32 scale (``edgeprune export --quantize int8``)."""
        return self.info(name)["dtype"] == "int8" and "scale" in self.info(name)

    def _stored_csr(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = ("csr", name)
        if key not in self._checked:
            if self._decoding is not None:
                self._decoded_event.wait()
            decoded = self._decoded.pop(name, None)
            if isinstance(decoded, Exception):
                raise decoded
            self._checked[key] = decoded if decoded is not None else self._read_csr(name)
        return self._checked[key]

    def _read_csr(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, cols = self.matrix_shape(name)
        where = f"{self.path}: {name!r}"
        indices = self._member(f"{name}.indices")
        if self.info(name).get("indices") == "delta":
            data, _, indptr = check_csr(where, self._member(f"{name}.data"), indices, self._member(f"{name}.indptr"),
                                        rows, max(cols, 256), int8=self.is_int8(name),
                                        int32_indices=False)  # the structure; then the gaps
            return data, undelta(where, indices, indptr, cols), indptr
        return check_csr(where, self._member(f"{name}.data"), indices, self._member(f"{name}.indptr"), rows, cols,
                         int8=self.is_int8(name))

    def nonzeros(self, name: str) -> int:
        """How many of the tensor's stored values are not zero (for the tuner's cost model)."""
        values = self._stored_csr(name)[0] if self.is_sparse(name) else self._dense_stored(name)
        return int(np.count_nonzero(values))

    def scale(self, name: str) -> np.ndarray:
        """An int8 tensor's scales as float32 ``[rows, 1]`` (axis 0: one per row) or ``[1, 1]`` (one)."""
        info = self.info(name)
        scale = self._member(info["scale"])
        rows = self.matrix_shape(name)[0]
        per_row = "axis" in info
        if scale.dtype != np.float32 or scale.size != (rows if per_row else 1) or scale.ndim > 1:
            raise ModelDirError(f"{self.path}: {name!r} scale is {scale.dtype}{list(scale.shape)}, expected "
                                f"float32 [{rows if per_row else 1}]")
        if not np.all(np.isfinite(scale)):
            raise ModelDirError(f"{self.path}: {name!r} scale is not finite")
        return scale.reshape(-1, 1)

    def csr_arrays(self, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored CSR arrays of a sparse tensor, fully validated (float32, int32, int32); int8
        values come back multiplied by their scale, as onnxruntime's DequantizeLinear computes them."""
        data, indices, indptr = self._stored_csr(name)
        if self.is_int8(name):
            scale = self.scale(name)[:, 0]
            per_value = np.repeat(scale, np.diff(indptr)) if scale.size > 1 else scale
            data = (data.astype(np.float32) * per_value).astype(np.float32)
        return data, indices, indptr

    def csr(self, name: str) -> sp.csr_matrix:
        """The tensor as a float32 CSR matrix ``[shape[0], rest]`` (int32 indices, as scipy computes)."""
        rows, cols = self.matrix_shape(name)
        if not self.is_sparse(name):
            return sp.csr_matrix(self.dense(name).reshape(rows, cols).astype(np.float32, copy=False))
        # a copy: the stored arrays are read-only views of the checked bytes, and kernels sort indices in place
        return sp.csr_matrix(self.csr_arrays(name), shape=(rows, cols), copy=True)

    def _dense_stored(self, name: str) -> np.ndarray:
        key = ("dense", name)
        if key not in self._checked:
            self._checked[key] = self._read_dense(name)
        return self._checked[key]

    def _read_dense(self, name: str) -> np.ndarray:
        info = self.info(name)
        shape = tuple(int(d) for d in info["shape"])
        array = self._member(name)
        if array.shape != shape or array.dtype != _dtype(info["dtype"]):
            raise ModelDirError(f"{self.path}: {name!r} is {array.dtype}{list(array.shape)}, "
                                f"manifest says {info['dtype']}{list(shape)}")
        return array

    def dense(self, name: str) -> np.ndarray:
        """The tensor as a dense array of its logical shape (float weights become float32)."""
        info = self.info(name)
        shape = tuple(int(d) for d in info["shape"])
        if self.is_sparse(name):
            self._join_decoding()
            ahead = self._dense_ahead.pop(name, None)
            if ahead is not None and ("csr", name) in self._checked:  # made from the arrays check_all took
                return ahead
            return csr_to_dense(*self.csr_arrays(name), *self.matrix_shape(name)).reshape(shape)
        array = self._dense_stored(name)
        if self.is_int8(name):
            matrix = array.reshape(self.matrix_shape(name)).astype(np.float32) * self.scale(name)
            return matrix.astype(np.float32).reshape(shape)
        return array.astype(np.float32) if array.dtype == np.float16 else array

    def quantized(self, name: str) -> np.ndarray:
        """An int8 tensor's stored values, dense, in its logical shape (what an int8 engine is fed)."""
        if not self.is_int8(name):
            raise ModelDirError(f"{self.path}: {name!r} is not an int8 tensor")
        shape = tuple(int(d) for d in self.info(name)["shape"])
        if not self.is_sparse(name):
            return self._dense_stored(name)
        data, indices, indptr = self._stored_csr(name)
        rows, cols = self.matrix_shape(name)
        flat = np.zeros(rows * cols, dtype=np.int8)
        row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))
        flat[row_of * cols + indices] = data
        return flat.reshape(shape)

    def check_all(self) -> None:
        """Validate every stored array (CSR structure, shapes, dtypes, int8 scales) before any engine
        runs: an engine that never reads one (the int8 one skips the scales) must not hide a bad file."""
        for name, info in self.tensors.items():
            if info["storage"] == "csr":
                self._stored_csr(name)
            else:
                self._dense_stored(name)
            if info["dtype"] == "int8" and "scale" in info:  # is_int8
                self.scale(name)

    def fed(self) -> Dict[str, np.ndarray]:
        """Format 3: every tensor model.onnx leaves to be fed, as the dense float32 array onnxruntime runs."""
        return {name: np.ascontiguousarray(self.dense(name), dtype=np.float32)
                for name, info in self.tensors.items() if info.get("onnx") == "fed"}

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


def read_sample(model_dir: Path, manifest: Dict[str, Any]) -> Tuple[Dict[str, np.ndarray], np.ndarray, float]:
    """``(inputs by name, expected output, atol)``: the smoke test a MODEL_DIR records (ModelDirError
    when it has none)."""
    weights = Weights(model_dir, manifest)
    try:
        _, expected, atol = weights.sample(manifest)
        return weights.sample_inputs(manifest), expected, atol
    finally:
        weights.close()
