"""Weight kernels: multiply by a layer's weight matrix M ``[out, K]``, dense (BLAS) or CSR (scipy).

Every weight layer reduces to one of two products: ``rows(A) = A @ M.T`` for Gemm/MatMul
(``A [R, K]``), and ``cols(C) = M @ C`` for Conv's im2col columns (``C [K, P]``). The CSR kernel can
split M into row blocks of about equal non-zeros and run them in threads: scipy's sparse products
release the GIL, so on a multi-core device the blocks run in parallel.

Grouped convolutions never loop over groups in Python: the CSR form is one block-diagonal matrix over
all input channels (its zeros cost nothing), the dense form one batched matmul ``[G, Og, K] @ [G, K, P]``,
which for a depthwise conv is ``[C, 1, k] @ [C, k, P]``.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import List, Optional, Tuple

import numpy as np
import scipy.sparse as sp

KINDS = ("dense", "sparse", "sparse-mt")  # sparse-mt: CSR row blocks run on the thread pool


class DenseKernel:
    """M as a dense float32 array; numpy's BLAS does the work."""

    kind = "dense"

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.transposed = np.ascontiguousarray(self.matrix.T)  # A @ M.T reads M.T row-major
        self.shape = self.matrix.shape

    def rows(self, a: np.ndarray) -> np.ndarray:
        return a @ self.transposed

    def cols(self, c: np.ndarray) -> np.ndarray:
        return self.matrix @ c

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes


class CsrKernel:
    """M as a scipy CSR matrix, optionally split into row blocks run on ``pool``."""

    kind = "sparse"

    def __init__(self, matrix: sp.csr_matrix, pool: Optional[Executor] = None, blocks: int = 1) -> None:
        self.matrix = matrix
        self.shape = matrix.shape
        self.pool = pool if blocks > 1 else None
        self.blocks: List[Tuple[slice, sp.csr_matrix]] = row_blocks(matrix, blocks) if self.pool else []

    def _product(self, x: np.ndarray) -> np.ndarray:
        """M @ x for x [K] or [K, P], in row blocks across threads when configured."""
        if self.pool is None:
            return self.matrix @ x
        out = np.empty((self.shape[0],) + x.shape[1:], dtype=np.float32)

        def block(item: Tuple[slice, sp.csr_matrix]) -> None:
            rows, part = item
            out[rows] = part @ x

        for future in [self.pool.submit(block, item) for item in self.blocks]:
            future.result()
        return out

    def rows(self, a: np.ndarray) -> np.ndarray:
        if a.shape[0] == 1:  # batch 1: a matrix-vector product, scipy's fastest path
            return self._product(a[0])[None, :]
        return np.ascontiguousarray(self._product(np.ascontiguousarray(a.T)).T)

    def cols(self, c: np.ndarray) -> np.ndarray:
        return self._product(np.ascontiguousarray(c))

    @property
    def nbytes(self) -> int:
        return self.matrix.data.nbytes + self.matrix.indices.nbytes + self.matrix.indptr.nbytes


class GroupedDenseKernel:
    """A grouped conv's weight as ``[G, Og, K]``: ``cols(C)`` for C ``[G*K, P]`` is one batched matmul."""

    kind = "dense"

    def __init__(self, matrix: np.ndarray, groups: int) -> None:
        self.groups = groups
        self.weight = np.ascontiguousarray(matrix, dtype=np.float32).reshape(groups, matrix.shape[0] // groups, -1)
        self.shape = (matrix.shape[0], groups * self.weight.shape[2])

    def cols(self, c: np.ndarray) -> np.ndarray:
        y = np.matmul(self.weight, c.reshape(self.groups, self.weight.shape[2], -1))
        return y.reshape(self.shape[0], -1)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


def block_diagonal(matrix: sp.csr_matrix, groups: int) -> sp.csr_matrix:
    """A grouped conv's CSR ``[O, Cg*k]`` as ``[O, G*Cg*k]``: row r of group g moves to columns
    ``g*Cg*k + ...``, so one sparse product covers every group."""
    rows, width = matrix.shape
    shift = (np.arange(rows) // (rows // groups)) * width
    indices = matrix.indices + np.repeat(shift, np.diff(matrix.indptr)).astype(matrix.indices.dtype)
    return sp.csr_matrix((matrix.data, indices, matrix.indptr.copy()), shape=(rows, groups * width))


def row_blocks(matrix: sp.csr_matrix, count: int) -> List[Tuple[slice, sp.csr_matrix]]:
    """Split rows into ``count`` contiguous blocks holding about the same number of non-zeros."""
    targets = np.linspace(0, matrix.nnz, count + 1)[1:-1]
    cuts = [0, *np.searchsorted(matrix.indptr, targets).tolist(), matrix.shape[0]]
    cuts = sorted(set(int(c) for c in cuts))
    return [(slice(a, b), matrix[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]


def make_kernel(kind: str, dense: Optional[np.ndarray], csr: Optional[sp.csr_matrix],
                pool: Optional[Executor], threads: int):
    """Build the kernel of ``kind`` from whichever form of M is given (the other is derived)."""
    if kind == "dense":
        return DenseKernel(dense if dense is not None else csr.toarray())
    matrix = csr if csr is not None else sp.csr_matrix(dense)
    matrix.sort_indices()
    return CsrKernel(matrix, pool, threads if kind == "sparse-mt" else 1)
