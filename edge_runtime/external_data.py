"""External data beside a plain ONNX file: the weights torch's default (dynamo) exporter and
``onnx.save_model(..., save_as_external_data=True)`` write to ``model.onnx.data``.

    files = ExternalFiles(Path("models"), "models/model.onnx")
    array = files.read(tensor, limit)   # one initializer's values, checked

The file is untrusted, and onnxruntime 1.19 (the Pi's) follows any location, ``..`` and symlinks
included. So the runtime reads every external tensor itself, under the rules onnxruntime's newer
releases apply, and hands the arrays to onnxruntime (``add_external_initializers``): onnxruntime never
opens a file the model names. A location must be a bare file name in the model's own folder (not
absolute, no folder part, no ``..``), a regular file (never a symlink, FIFO or device:
``safe_io.open_regular``); each tensor's offset and length must be decimal, lie inside that file and
match the tensor's type and shape; and every tensor counts against EDGEPRUNE_MAX_MODEL_BYTES before its
bytes are read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Dict, Optional

import numpy as np

from edge_runtime import onnx_wire
from edge_runtime.errors import ModelDirError
from edge_runtime.onnx_wire import DATA_TYPES, Tensor
from edge_runtime.safe_io import open_regular

KEYS = {"location", "offset", "length", "checksum"}  # what onnxruntime's ExternalDataInfo reads
DECIMAL = re.compile(r"[0-9]{1,19}")


class ExternalFiles:
    """The data files one model's tensors read, each opened once; ``folder`` None (model bytes): none."""

    def __init__(self, folder: Optional[Path], where: str) -> None:
        self.folder = folder
        self.where = where
        self._open: Dict[str, BinaryIO] = {}

    def read(self, tensor: Tensor, limit: int) -> np.ndarray:
        """``tensor``'s values from its external file, after every check in the module docstring; a
        tensor over ``limit`` bytes is refused before a byte is read."""
        what = f"{self.where}: initializer {tensor.name!r}"
        if self.folder is None:
            raise ModelDirError(f"{what} uses external data, which model bytes cannot carry (pass the "
                                "file's path instead)")
        if tensor.data_location != onnx_wire.EXTERNAL or tensor.has_inline_data:
            raise ModelDirError(f"{what} mixes inline and external data")
        if not set(tensor.external) <= KEYS or "location" not in tensor.external:
            raise ModelDirError(f"{what} has external_data keys {sorted(tensor.external)}")
        dtype, count = _dtype_and_count(tensor, what)
        nbytes = count * dtype.itemsize
        if nbytes > limit:
            raise ModelDirError(f"{what} takes {nbytes:,} bytes, more than the {limit:,} left of "
                                "EDGEPRUNE_MAX_MODEL_BYTES")
        handle = self._file(tensor.external["location"], what)
        size = os.fstat(handle.fileno()).st_size
        offset = _decimal(tensor.external.get("offset", "0"), "offset", what)
        length = _decimal(tensor.external.get("length", str(max(size - offset, 0))), "length", what)
        if length != nbytes:
            raise ModelDirError(f"{what}: external length {length:,} is not the {nbytes:,} bytes of its "
                                f"shape {tensor.dims}")
        if offset + length > size:
            raise ModelDirError(f"{what}: external bytes {offset:,}..{offset + length:,} run past the end of "
                                f"{tensor.external['location']!r} ({size:,} bytes)")
        handle.seek(offset)
        data = handle.read(length)
        if len(data) != length:  # the file shrank while we read it
            raise ModelDirError(f"{what}: {tensor.external['location']!r} ended early")
        return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(tensor.dims)

    def _file(self, location: str, what: str) -> BinaryIO:
        if location not in self._open:
            self._open[location] = open_regular(self.folder / _bare_name(location, what))
        return self._open[location]

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open = {}


def _bare_name(location: str, what: str) -> str:
    """``location`` when it names a file in the model's own folder, else one line saying why not."""
    if (not location or "/" in location or "\\" in location or "\0" in location or location in (".", "..")
            or os.path.isabs(location)):
        raise ModelDirError(f"{what} reads external data from {location!r}; only a file beside the model is "
                            "allowed (a bare file name: not absolute, no folder, no '..')")
    return location


def _decimal(text: str, key: str, what: str) -> int:
    if not DECIMAL.fullmatch(text):
        raise ModelDirError(f"{what}: external {key} {text!r} is not a non-negative decimal integer")
    return int(text)


def _dtype_and_count(tensor: Tensor, what: str):
    """The numpy dtype and element count of ``tensor``'s declared type and shape."""
    if tensor.data_type not in DATA_TYPES:
        raise ModelDirError(f"{what} has ONNX data type {tensor.data_type}, which this runtime does not read")
    if any(d < 0 for d in tensor.dims):
        raise ModelDirError(f"{what} has shape {tensor.dims}")
    count = int(np.prod(tensor.dims, dtype=object)) if tensor.dims else 1
    return np.dtype(DATA_TYPES[tensor.data_type][0]), count
