"""weights.npz: the single copy of every tensor, and where each one's bytes sit inside the file.

The archive is an uncompressed ``.npz`` (``np.savez``, ZIP_STORED, no pickle), so each member's raw
array bytes lie contiguously in the file. ONNX external data can then point straight at them
(``location=weights.npz, offset, length``), which lets stock onnxruntime load ``model.onnx`` while
numpy/scipy read the same bytes as named arrays: one copy serves both readers.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Tuple

import numpy as np

from compressor.errors import ExportError

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # the zip local file header's 30 fixed bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed .npz; member names are the keys (plus numpy's ``.npy``)."""
    with open(path, "wb") as handle:
        np.savez(handle, **{key: np.asarray(value, order="C") for key, value in arrays.items()})  # keeps 0-d


def member_offsets(path: Path) -> Dict[str, Tuple[int, int]]:
    """Map each array key of an uncompressed .npz to (offset, length) of its raw data in the file.

    The offset is found from the zip local header (whose extra field may differ from the central
    directory's copy, so it is read from the file itself) plus the .npy header that precedes the data.
    """
    offsets: Dict[str, Tuple[int, int]] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ExportError(f"{path}: member {info.filename} is compressed; external data needs it stored")
            handle.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
            if fields[0] != _LOCAL_SIGNATURE:
                raise ExportError(f"{path}: bad zip local header for {info.filename}")
            name_len, extra_len = fields[-2], fields[-1]
            data_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            handle.seek(data_start)
            version = np.lib.format.read_magic(handle)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(handle)
            shape, _, dtype = header
            length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            offsets[key] = (handle.tell(), length)
    return offsets
