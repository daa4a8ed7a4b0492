"""Build hostile MODEL_DIRs from a valid one, the way an attacker would: every hash made valid again.

Tests only (uses the real ``onnx`` package to rewrite model.onnx). Nothing here is committed as a
file: each test generates its own folder from a fixture copy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from edge_runtime.model_format import sha256_of

REPO = Path(__file__).resolve().parent.parent


def rehash(model_dir: Path) -> None:
    """Make every listed file's sha256 match again (what anyone editing a MODEL_DIR can do)."""
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if isinstance(manifest.get("files"), dict):
        for name in manifest["files"]:
            target = model_dir / name
            if target.is_file() and not target.is_symlink() and ".." not in name and not name.startswith("/"):
                manifest["files"][name] = sha256_of(target)
    path.write_text(json.dumps(manifest))


def edit_manifest(model_dir: Path, change: Callable[[dict], None]) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def edit_onnx(model_dir: Path, change: Callable) -> None:
    """Change model.onnx with the onnx package (external data left as references), then rehash."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    change(model)
    (model_dir / "model.onnx").write_bytes(model.SerializeToString())
    rehash(model_dir)


def set_external(tensor, **entries: str) -> None:
    """Overwrite external_data entries (location/offset/length) of an ONNX TensorProto."""
    for entry in tensor.external_data:
        if entry.key in entries:
            entry.value = str(entries[entry.key])


def make_external(tensor, location: str, offset: int, length: int) -> None:
    """Turn an ONNX TensorProto (an inline constant included) into external data at these bytes."""
    import onnx

    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def rewrite_npz(model_dir: Path, change: Callable[[Dict[str, np.ndarray]], None]) -> None:
    """Rewrite weights.npz with changed arrays, re-point model.onnx at the new offsets, rehash: a
    consistent folder whose arrays say what the attacker wants."""
    from compressor.export.onnx_npz import member_offsets, write_npz

    with np.load(model_dir / "weights.npz", allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    change(arrays)
    write_npz(model_dir / "weights.npz", arrays)
    offsets = member_offsets(model_dir / "weights.npz")

    def repoint(model) -> None:
        graph = model.graph
        for tensor in [*graph.initializer, *(s.values for s in graph.sparse_initializer)]:
            name = tensor.name[:-len("__fp16")] if tensor.name.endswith("__fp16") else tensor.name
            key = name if name in offsets else f"{name}.data"
            offset, length = offsets[key]
            set_external(tensor, offset=offset, length=length)
    edit_onnx(model_dir, repoint)


def cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, **kwargs)


def assert_one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback (and no crash: a signal is < 0)."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert needle in lines[0], lines[0]
