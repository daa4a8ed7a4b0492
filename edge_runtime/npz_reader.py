"""weights.npz read defensively: every member stored (never compressed), sized before allocating.

``np.load`` on an untrusted .npz decompresses a member fully before anyone can look at its shape (a
4 MB file became 4 GB of RSS). Here the archive's directory is read first; each member must be
ZIP_STORED, hold one C-order .npy array of a plain numeric dtype, and its header's shape × itemsize
must equal the bytes the member really has, within the file. Only then is the array read, straight
from its offset. The same offsets are what model.onnx's external data must point at
(see ``onnx_check``).
"""

from __future__ import annotations

import ast
import io
import math
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from edge_runtime.model_format import ModelDirError, open_regular

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # the zip local file header's 30 fixed bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 1 << 16
MAX_MEMBERS = 1 << 16
DTYPE_KINDS = "fiub"  # float, signed, unsigned, bool: nothing with objects or pointers
# the header numpy itself writes; anything else goes through the general (slower) literal parser
_CANONICAL_HEADER = re.compile(r"\{'descr': '([<|][fiub][0-9]{1,2})', 'fortran_order': False, "
                               r"'shape': \(((?:[0-9]{1,13}, )*[0-9]{1,13},?|)\), \} *\n?")


_DESCR_DTYPES: Dict[str, np.dtype] = {}  # "<f4" -> dtype: a few distinct descrs, hundreds of members


def _npy_dtype(descr: str) -> np.dtype:
    """The dtype of a canonical header's descr (matched by _CANONICAL_HEADER: a plain numeric type)."""
    if descr not in _DESCR_DTYPES:
        _DESCR_DTYPES[descr] = np.dtype(descr)
    return _DESCR_DTYPES[descr]


@dataclass(frozen=True)
class Member:
    """One array of the archive: where its raw bytes are and what they are."""

    offset: int          # of the first data byte, in the .npz file
    nbytes: int
    shape: Tuple[int, ...]
    dtype: np.dtype


class NpzArchive:
    """The members of an uncompressed .npz, checked; ``read(key)`` returns one array.

    With ``data`` (the file's bytes, already read and hashed: model_dir.FolderFiles) the archive is
    parsed from memory and ``read`` returns read-only views of those bytes, no copy."""

    def __init__(self, path: Path, limit: int, data: Optional[bytes] = None) -> None:
        self.path = Path(path)
        self._data = data
        self._file = io.BytesIO(data) if data is not None else open_regular(self.path)
        try:
            self.size = len(data) if data is not None else os.fstat(self._file.fileno()).st_size
            self.members = self._scan(limit)
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def _error(self, what: str) -> ModelDirError:
        return ModelDirError(f"{self.path}: {what}")

    def _scan(self, limit: int) -> Dict[str, Member]:
        try:
            infos = zipfile.ZipFile(self._file).infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as error:
            raise self._error(f"corrupt or truncated ({error})") from None
        if len(infos) > MAX_MEMBERS:
            raise self._error(f"more than {MAX_MEMBERS} members")
        members: Dict[str, Member] = {}
        total = 0
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else None
            if key is None or key in members:
                raise self._error(f"member {info.filename!r} is not a unique .npy array")
            member = self._member(info)
            total += member.nbytes
            if total > limit:
                raise self._error(f"members hold more than {limit:,} bytes (EDGEPRUNE_MAX_MODEL_BYTES)")
            members[key] = member
        return members

    def _member(self, info: zipfile.ZipInfo) -> Member:
        name = info.filename
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise self._error(f"member {name!r} is compressed; a MODEL_DIR stores every member uncompressed")
        if info.flag_bits & 0x1:
            raise self._error(f"member {name!r} is encrypted")
        head = self._bytes_at(info.header_offset, _LOCAL_HEADER.size)
        if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_SIGNATURE:
            raise self._error(f"bad zip local header for {name!r}")
        fields = _LOCAL_HEADER.unpack(head)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if start + info.file_size > self.size:
            raise self._error(f"member {name!r} runs past the end of the file")
        prefix = self._bytes_at(start, min(info.file_size, MAX_NPY_HEADER + 12))
        shape, dtype, header_len = self._npy_header(name, prefix)
        nbytes = math.prod(shape) * dtype.itemsize
        if header_len + nbytes != info.file_size:
            raise self._error(f"member {name!r} declares shape {list(shape)} of {dtype} ({nbytes:,} bytes) "
                              f"but holds {info.file_size - header_len:,} bytes")
        return Member(start + header_len, nbytes, shape, dtype)

    def _bytes_at(self, offset: int, size: int) -> Union[bytes, memoryview]:
        """Up to ``size`` bytes at ``offset``: a view of the bytes in memory (no copy), else read from the file."""
        if self._data is not None:
            return memoryview(self._data)[offset:offset + size]
        self._file.seek(offset)
        return self._file.read(size)

    def _npy_header(self, name: str, prefix: Union[bytes, memoryview]) -> Tuple[Tuple[int, ...], np.dtype, int]:
        """Parse a .npy header from its bytes (never from the open file: its length is checked first)."""
        if prefix[:6] != _NPY_MAGIC or len(prefix) < 10:
            raise self._error(f"member {name!r} is not a .npy array")
        major = prefix[6]
        size_format, fixed = ("<H", 10) if major == 1 else ("<I", 12) if major in (2, 3) else (None, 0)
        if size_format is None or len(prefix) < fixed:
            raise self._error(f"member {name!r} has an unknown .npy version")
        length = struct.unpack(size_format, prefix[8:fixed])[0]
        if fixed + length > len(prefix):
            raise self._error(f"member {name!r} has a .npy header longer than its data allows")
        text = bytes(prefix[fixed:fixed + length]).decode("latin1")
        canonical = _CANONICAL_HEADER.fullmatch(text)
        try:
            if canonical:  # numpy's own header: read without compiling it (hundreds of members per model)
                dtype, fortran = _npy_dtype(canonical[1]), False
                dims = canonical[2].rstrip(", ")  # "3, 4" / "3," / "": digits the pattern matched
                shape = tuple(map(int, dims.split(","))) if dims else ()
            else:
                header = ast.literal_eval(text)
                dtype = np.dtype(header["descr"]) if isinstance(header["descr"], str) else None
                shape = tuple(header["shape"])
                fortran = header["fortran_order"]
        except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError):
            raise self._error(f"member {name!r} has a malformed .npy header") from None
        if dtype is None or dtype.kind not in DTYPE_KINDS or dtype.byteorder == ">" or fortran is not False:
            raise self._error(f"member {name!r} is not a little-endian C-order numeric array")
        valid_dim = lambda d: isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40  # noqa: E731
        if len(shape) > 8 or not all(valid_dim(d) for d in shape):
            raise self._error(f"member {name!r} has an invalid shape {shape!r}")
        return shape, dtype, fixed + length

    def raw(self, key: str) -> bytes:
        """The member's data bytes (little-endian, C order), without its headers."""
        member = self.members.get(key)
        if member is None:
            raise self._error(f"member {key!r} is missing")
        if self._data is not None:
            return self._data[member.offset:member.offset + member.nbytes]
        return self.read(key).tobytes()

    def read(self, key: str) -> np.ndarray:
        """The member ``key`` as an array (its size was checked against the file when scanning)."""
        member = self.members.get(key)
        if member is None:
            raise self._error(f"member {key!r} is missing")
        if self._data is not None:
            return np.frombuffer(self._data, member.dtype, math.prod(member.shape), member.offset).reshape(member.shape)
        array = np.empty(member.shape, dtype=member.dtype)
        if member.nbytes == 0:
            return array
        self._file.seek(member.offset)
        if self._file.readinto(memoryview(array.reshape(-1).view(np.uint8))) != member.nbytes:
            raise self._error(f"member {key!r} is truncated")
        return array


def read_all(path: Path, limit: int) -> Dict[str, np.ndarray]:
    """Every member of a checked .npz (small archives: fixtures, samples)."""
    archive = NpzArchive(path, limit)
    try:
        return {key: archive.read(key) for key in archive.members}
    finally:
        archive.close()


__all__ = ["Member", "NpzArchive", "read_all"]
