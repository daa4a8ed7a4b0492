"""Reading and writing checkpoints: atomic writes, ``weights_only`` reads, random-state capture.

Every write goes through ``edge_runtime.safe_io.atomic_writer`` (an exclusively created temporary file
in the same folder, renamed over the target), so a kill at any moment leaves either the old file or
the new one.
Every read uses ``torch.load(..., weights_only=True)``: checkpoints may come from users, and a full
unpickle could run arbitrary code. Before that, every zip member's CRC-32 is checked: ``torch.save``
writes one per member (tensor data included) but ``torch.load`` never verifies them, so a flipped
bit would otherwise load silently. A failed write (full disk, file size limit) is one
``CheckpointError`` line, and the file it was replacing is left as it was.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, ContextManager, Dict, Iterable, Optional

import numpy as np
import torch

from compressor.errors import CheckpointError
from edge_runtime.safe_io import atomic_writer


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same folder + ``os.replace``).

    A write the filesystem refuses (ENOSPC, EFBIG, EIO) is a ``CheckpointError`` naming the file;
    the temporary file is removed and ``path`` keeps its previous content.
    """
    try:
        with _writer(path) as handle:
            torch.save(obj, handle)
    except BaseException as error:
        _raise_if_write_failed(error, path)
        raise


def _writer(path: Path) -> ContextManager[BinaryIO]:
    """The format owner's atomic writer (exclusive temp file, fsync, rename), the folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_writer(path)


def _raise_if_write_failed(error: BaseException, path: Path) -> None:
    """A ``CheckpointError`` naming ``path`` if ``error`` is the filesystem refusing a write."""
    # torch's zip writer turns the OSError of a failed write into a RuntimeError ("unexpected pos").
    cause = error if isinstance(error, OSError) else error.__context__
    if isinstance(error, (OSError, RuntimeError)) and isinstance(cause, OSError):
        reason = os.strerror(cause.errno) if cause.errno else str(cause)
        raise CheckpointError(f"cannot write {path}: {reason}; its previous version (if any) is intact: "
                              "free space and continue with --resume") from error


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write a file atomically; a refused write is a ``CheckpointError`` (see ``atomic_save``)."""
    try:
        with _writer(path) as handle:
            handle.write(data)
    except BaseException as error:
        _raise_if_write_failed(error, path)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write_bytes(text.encode("utf-8"), path)


def verify_crc(path: Path) -> None:
    """``CheckpointError`` if a member of a zip-format checkpoint fails its CRC-32 (a flipped bit).

    Files in torch's legacy (non-zip) format have no checksum to verify and are left to ``torch.load``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({error})") from error
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: {bad} fails its CRC-32 check (a changed byte); "
                              "restore it or delete it to redo that step with --resume")


def load(path: Path, map_location: Optional[str] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` after verifying its checksums.

    ``CheckpointError`` if it is missing, damaged or not a checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_crc(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, ImportError, IndexError, KeyError, TypeError, OSError) as error:
        # torch reports truncation, foreign pickles and refused classes through many types.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first_line})") from error
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def cpu_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A CPU copy of ``model.state_dict()`` that keeps its ``_metadata`` (module versions).

    ``load_state_dict`` hands each module its saved version; modules whose format changed (BatchNorm's
    ``num_batches_tracked``, torchvision's MNASNet) refuse or misread a state_dict without it.
    ``torch.load(weights_only=True)`` restores the attribute.
    """
    state = model.state_dict()
    copy = collections.OrderedDict((name, tensor.detach().cpu().clone()) for name, tensor in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        copy._metadata = metadata  # type: ignore[attr-defined]
    return copy


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A model's weights from a plain state_dict ``.pt`` or an edgeprune ``final.pt``/``checkpoint.pt``."""
    obj = load(path)
    if _is_state_dict(obj):
        return obj
    if _is_state_dict(obj.get("model")):
        return obj["model"]
    raise CheckpointError(f"{path} is neither a state_dict nor an edgeprune checkpoint")


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` with a one-line ``CheckpointError`` when they do not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        raise CheckpointError(f"{source} does not fit the model: {detail[:300]}") from error


def capture_rng(generators: Iterable[Optional[torch.Generator]]) -> Dict[str, Any]:
    """Every random state a training epoch consumes (global torch/CUDA, Python, numpy, loaders)."""
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "generators": [g.get_state() if g is not None else None for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any], generators: Iterable[Optional[torch.Generator]]) -> None:
    """Undo :func:`capture_rng` (the inverse, given the same generators in the same order)."""
    torch.set_rng_state(state["torch"])
    py = [int(v) for v in state["python"]]
    random.setstate((state["python_version"], tuple(py), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    for gen, saved in zip(generators, state["generators"]):
        if gen is not None and saved is not None:
            gen.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
