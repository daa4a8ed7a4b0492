"""CSR encoding of pruned weights and the rule that decides sparse or dense storage.

A weight of shape ``[out, in, kh, kw]`` (or ``[out, in]``) is viewed as the matrix
``[out, in*kh*kw]``. Its CSR arrays (weights.npz) are what the edge runtime computes with; the
linearised int64 ``coo`` indices exist only because ONNX sparse initializers need them (onnxruntime
accepts no other index type) and live inside model.onnx itself: onnxruntime before 1.2x cannot read
sparse indices from external data. Both index arrays describe the same non-zeros in the same order,
so ONNX's ``values`` can point at the very bytes of the CSR ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np


@dataclass(frozen=True)
class CsrWeight:
    """The CSR form of one weight tensor, in the compact dtypes stored in weights.npz."""

    shape: tuple
    data: np.ndarray      # float32 or float16, [nnz]
    indices: np.ndarray   # column indices, smallest unsigned dtype that fits
    indptr: np.ndarray    # int32, [rows + 1]
    coo: np.ndarray       # int64 linearised indices into the flat tensor, [nnz] (model.onnx only)

    def arrays(self, name: str) -> Dict[str, np.ndarray]:
        """The weights.npz members for this weight, named as the MODEL_DIR format says."""
        return {f"{name}.data": self.data, f"{name}.indices": self.indices, f"{name}.indptr": self.indptr}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.indices, self.indptr, self.coo))


def index_dtype(columns: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every column index of a matrix this wide."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if columns - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def encode_csr(weight: np.ndarray, values_dtype: np.dtype) -> CsrWeight:
    """CSR of ``weight`` viewed as ``[shape[0], rest]``, keeping exactly its non-zero entries.

    A weight with no non-zero at all keeps one explicit zero: onnxruntime cannot map an empty external
    tensor, and an explicit zero changes no result.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    rows, cols = np.nonzero(matrix)  # row-major order: sorted rows, sorted columns within a row
    if rows.size == 0:
        rows, cols = np.zeros(1, np.int64), np.zeros(1, np.int64)
    counts = np.bincount(rows, minlength=matrix.shape[0])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return CsrWeight(
        shape=tuple(weight.shape),
        data=matrix[rows, cols].astype(values_dtype),
        indices=cols.astype(index_dtype(matrix.shape[1])),
        indptr=indptr,
        coo=(rows.astype(np.int64) * matrix.shape[1] + cols.astype(np.int64)),
    )


def sparse_is_smaller(weight: np.ndarray, values_dtype: np.dtype, onnx_indices: bool = True) -> bool:
    """True when CSR (+ the int64 coo copy in model.onnx, with ``onnx_indices``: the external layout)
    takes fewer bytes than the dense tensor in ``values_dtype``.

    Storage is only about size: the runtime builds whichever form it computes with at load time.
    """
    nnz = max(int(np.count_nonzero(weight)), 1)
    rows = weight.shape[0]
    cols = weight.size // max(rows, 1)
    per_nonzero = np.dtype(values_dtype).itemsize + index_dtype(cols).itemsize + (8 if onnx_indices else 0)
    sparse_bytes = nnz * per_nonzero + (rows + 1) * 4
    return sparse_bytes < weight.size * np.dtype(values_dtype).itemsize


DELTA_STEP = 255  # the largest gap one uint8 delta spans; a longer gap gets explicit zeros every 255 columns


def encode_delta_csr(weight: np.ndarray, values_dtype: np.dtype) -> Dict[str, np.ndarray]:
    """CSR whose column indices are uint8 *gaps* (format 3, ``"indices": "delta"``): in each row the
    first is the column itself, then the distance from the previous entry. A gap over 255 is bridged by
    explicit zeros 255 columns apart, so every gap fits one byte: for a conv weight ``[out, in*9]``
    (usually over 256 columns) this halves the index bytes for a few explicit zeros.

    Returns the weights.npz members ``{NAME.data, NAME.indices, NAME.indptr}`` keyed without NAME
    (``"data"``, ``"indices"``, ``"indptr"``)."""
    base = encode_csr(weight, values_dtype)
    rows = np.repeat(np.arange(base.indptr.size - 1), np.diff(base.indptr))
    cols = base.indices.astype(np.int64)
    first = np.ones(cols.size, bool)
    first[1:] = rows[1:] != rows[:-1]
    gaps = np.where(first, cols, cols - np.concatenate([[0], cols[:-1]]))
    pads = np.maximum(0, (gaps - 1) // DELTA_STEP)  # explicit zeros this entry needs before it
    counts = pads + 1
    last = np.cumsum(counts) - 1  # where each real entry lands
    deltas = np.full(int(counts.sum()), DELTA_STEP, np.int64)
    deltas[last] = gaps - DELTA_STEP * pads
    data = np.zeros(deltas.size, base.data.dtype)
    data[last] = base.data
    per_row = np.bincount(np.repeat(rows, counts), minlength=base.indptr.size - 1)
    indptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return {"data": data, "indices": deltas.astype(np.uint8), "indptr": indptr}


def csr_bytes(members: Dict[str, np.ndarray]) -> int:
    """The bytes of a CSR encoding's arrays (what weights.npz stores for it)."""
    return sum(array.nbytes for array in members.values())
