"""Build the device's ``edgeprune-runtime`` wheel from this checkout, offline, with zipfile.

No pip, no ``build``, no network: a wheel is a zip with the package files and a ``.dist-info``
folder. The version carries a hash of the content (``0.1.0+h1a2b3c4d5e6f``), so "is the device's
runtime up to date?" is a comparison of two hashes, and the same checkout always gives the same
bytes (fixed timestamps, sorted entries).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from edge_runtime import __version__ as BASE_VERSION

DIST_NAME = "edgeprune-runtime"
#: What the runtime needs on the device: (distribution, minimum version, import name).
REQUIREMENTS: List[Tuple[str, str, str]] = [
    ("numpy", "1.24", "numpy"),
    ("scipy", "1.10", "scipy"),
    ("onnxruntime", "1.16", "onnxruntime"),
]
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # reproducible zips: same content, same bytes


@dataclass(frozen=True)
class RuntimeWheel:
    """A built wheel: where it is, its version, and the content hash the device records."""

    path: Path
    version: str
    content_hash: str


def runtime_source() -> Path:
    """The ``edge_runtime`` package folder of this checkout (found without importing it)."""
    spec = importlib.util.find_spec("edge_runtime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the edge_runtime package is not importable from this checkout")
    return Path(list(spec.submodule_search_locations)[0])


def _package_files(source: Path) -> List[Path]:
    return sorted(p for p in source.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"))


def _metadata(version: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {DIST_NAME}", f"Version: {version}",
             "Summary: edgeprune's device runtime: sparse ONNX + CSR models on numpy/scipy/onnxruntime",
             "Requires-Python: >=3.9"]
    lines += [f"Requires-Dist: {dist}>={minimum}" for dist, minimum, _ in REQUIREMENTS]
    return "\n".join(lines) + "\n"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def content_hash(source: Optional[Path] = None) -> str:
    """12 hex digits of sha256 over the runtime's files, their paths and the requirements."""
    source = source or runtime_source()
    digest = hashlib.sha256(_metadata(BASE_VERSION).encode())
    for path in _package_files(source):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def build_runtime_wheel(out_dir: Path, source: Optional[Path] = None) -> RuntimeWheel:
    """Write ``edgeprune_runtime-VERSION-py3-none-any.whl`` into ``out_dir`` and describe it."""
    source = source or runtime_source()
    if not (source / "__init__.py").is_file():
        raise FileNotFoundError(f"{source} is not a Python package")
    digest = content_hash(source)
    version = f"{BASE_VERSION}+h{digest}"
    dist_info = f"{re.sub(r'[-_.]+', '_', DIST_NAME)}-{version}.dist-info"
    entries = [(f"edge_runtime/{p.relative_to(source).as_posix()}", p.read_bytes()) for p in _package_files(source)]
    entries += [
        (f"{dist_info}/METADATA", _metadata(version).encode()),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: edgeprune-deploy\nRoot-Is-Purelib: true\n"
                               b"Tag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt", b"[console_scripts]\nedge-runtime = edge_runtime.cli:main\n"),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{dist_info}/RECORD,,\n"
    entries.append((f"{dist_info}/RECORD", record.encode()))

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"edgeprune_runtime-{version}-py3-none-any.whl"
    temp = path.with_suffix(".partial")
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    temp.replace(path)
    return RuntimeWheel(path, version, digest)
