"""Opening an onnxruntime session on a MODEL_DIR's ONNX file, with the weights it is fed at load.

A format-3 (compact) MODEL_DIR keeps every weight once, in weights.npz, in the smallest form (CSR,
int8 or float16 values); its ONNX files hold placeholders. The runtime builds the dense arrays
onnxruntime needs and hands them over with ``SessionOptions.add_external_initializers`` (available
in onnxruntime 1.19, the Pi's, and later): no second copy of the weights is shipped or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np

from edge_runtime.errors import ModelDirError


def open_ort(source: Union[Path, bytes], threads: int, feeds: Optional[Dict[str, np.ndarray]] = None,
             log_level: int = 4, where: Optional[str] = None, data: Optional[bytes] = None) -> Any:
    """An onnxruntime CPU session on ``source`` (a path, or a model's bytes named ``where`` in messages)
    with ``threads`` intra-op threads, ``feeds`` supplying the file's placeholder (or external)
    initializers. ``data``: a path's bytes as this load read and checked them (onnxruntime then parses
    those, not the file again). ModelDirError when onnxruntime is missing or refuses the file."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelDirError("onnxruntime is not installed; use kernels='sparse' or 'dense'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = log_level  # its errors reach the user as our one line
    arrays = {name: np.ascontiguousarray(array) for name, array in (feeds or {}).items()}
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays.values()]
    if arrays:
        options.add_external_initializers(list(arrays), values)
    model = data if data is not None else source if isinstance(source, bytes) else str(source)
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors for bad files
        raise ModelDirError(f"onnxruntime cannot load {where or source}: {error}") from None
    # onnxruntime may compute straight from the fed buffers: they must live as long as the session.
    session._edgeprune_feeds = (arrays, values)
    return session
