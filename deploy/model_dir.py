"""The local MODEL_DIR as deploy sees it: the manifest's file list, checked, and a release id.

Deploy never imports the exporter or the runtime: it reads ``manifest.json`` as JSON, makes sure
every file it lists is present with the recorded sha256, and names the release after those hashes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

from deploy.errors import ModelDirError

MANIFEST = "manifest.json"
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
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_name(name: str) -> str:
    """A model name is one safe path component: letters, digits, ``._-``; not starting with a dot."""
    # fullmatch: `$` would also accept a trailing newline ("nl\n"), which is no safe path component.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ModelDirError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (max 64), "
                            "not starting with '.' or '-'")
    return name


def _check_relative(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in path:
        raise ModelDirError(f"manifest lists an unsafe path {path!r}")
    if any(ch in path for ch in "\n\r\0"):
        raise ModelDirError(f"manifest lists a path with control characters: {path!r}")
    return path


def load_model_dir(model_dir: Path) -> LocalModel:
    """Read and check MODEL_DIR; ModelDirError (one line) if anything is missing or does not match."""
    model_dir = Path(model_dir)
    manifest_path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is not a folder (expected a MODEL_DIR from `edgeprune export`)")
    if not manifest_path.is_file():
        raise ModelDirError(f"{model_dir} has no {MANIFEST}; is it a MODEL_DIR from `edgeprune export`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelDirError(f"{manifest_path} is not valid JSON ({error})") from None
    except OSError as error:
        raise ModelDirError(f"cannot read {manifest_path}: {error.strerror or error}") from None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise ModelDirError(f"{manifest_path} has no \"files\" table of sha256s")
    files: Dict[str, str] = {}
    size = manifest_path.stat().st_size
    for relative, expected in sorted(listed.items()):
        _check_relative(relative)
        if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise ModelDirError(f"{manifest_path}: the sha256 of {relative} is not 64 hex digits")
        path = model_dir / relative
        if not path.is_file():
            raise ModelDirError(f"{model_dir}: {relative} is listed in the manifest but missing")
        try:
            actual = sha256_file(path)
        except OSError as error:
            raise ModelDirError(f"cannot read {path}: {error.strerror or error}") from None
        if actual != expected:
            raise ModelDirError(f"{model_dir}: {relative} does not match its sha256 in the manifest "
                                "(corrupt or modified; export again)")
        files[relative] = expected
        size += path.stat().st_size
    files[MANIFEST] = sha256_file(manifest_path)
    identity = "".join(f"{path}\0{digest}\n" for path, digest in sorted(files.items()))
    release_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return LocalModel(model_dir, files, release_id, size)
