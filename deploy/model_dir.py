"""The local MODEL_DIR as deploy sees it: the manifest's file list, checked, and a release id.

Deploy never imports the exporter or the runtime's engines; it uses the format's one definition
(``edge_runtime.model_format``, standard library only) to read ``manifest.json``, refuses a format
version the runtime it ships cannot read (before any connection), makes sure every file it lists is a
regular file inside the folder with the recorded sha256, and names the release after those hashes.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence

from deploy.errors import ModelDirError
from edge_runtime import model_format
from edge_runtime.model_format import MANIFEST_FILE as MANIFEST
from edge_runtime.model_format import SUPPORTED_VERSIONS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class LocalModel:
    """A verified MODEL_DIR ready to ship."""

    path: Path
    files: Dict[str, str]  # relative path -> sha256, manifest.json included
    release_id: str  # 12 hex digits: same artifact, same id, on every host
    size: int  # bytes to upload

    def upload_order(self) -> list:
        """Relative paths, big data first and manifest.json last (it marks a complete copy)."""
        return sorted((p for p in self.files if p != MANIFEST), key=lambda p: (p.count("/"), p)) + [MANIFEST]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file (the format's helper; a deploy error when it cannot be read)."""
    try:
        return model_format.sha256_of(path)
    except model_format.ModelDirError as error:
        raise ModelDirError(str(error)) from None


def check_name(name: str) -> str:
    """A model name is one safe path component: letters, digits, ``._-``; not starting with a dot."""
    # fullmatch: `$` would also accept a trailing newline ("nl\n"), which is no safe path component.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ModelDirError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (max 64), "
                            "not starting with '.' or '-'")
    return name


def load_model_dir(model_dir: Path, supported_versions: Sequence[int] = SUPPORTED_VERSIONS) -> LocalModel:
    """Read and check MODEL_DIR; ModelDirError (one line) if anything is missing or does not match.

    ``supported_versions``: the format versions the runtime being shipped reads (this checkout's).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is not a folder (expected a MODEL_DIR from `edgeprune export`)")
    manifest_path = model_dir / MANIFEST
    try:
        manifest = model_format.load_manifest_json(model_dir)
        model_format.check_format(manifest, str(manifest_path), supported_versions)
        listed = model_format.listed_files(manifest, str(manifest_path))
        files = {name: _verified(model_dir, name, digest) for name, digest in sorted(listed.items())}
        files[MANIFEST] = model_format.sha256_of(manifest_path)
    except model_format.ModelDirError as error:
        raise ModelDirError(str(error)) from None
    size = sum((model_dir / name).stat().st_size for name in files)
    identity = "".join(f"{path}\0{digest}\n" for path, digest in sorted(files.items()))
    release_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return LocalModel(model_dir, files, release_id, size)


def _verified(model_dir: Path, relative: str, expected: str) -> str:
    path = model_format.inside(model_dir, relative)
    if not os.path.lexists(path):
        raise ModelDirError(f"{model_dir}: {relative} is listed in the manifest but missing")
    if model_format.sha256_of(path) != expected:
        raise ModelDirError(f"{model_dir}: {relative} does not match its sha256 in the manifest "
                            "(corrupt or modified; export again)")
    return expected
