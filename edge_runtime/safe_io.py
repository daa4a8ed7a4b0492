"""Reading and writing files that someone else may have planted: the one place every side does it.

A MODEL_DIR, a RUN_DIR or a cache folder may have come from elsewhere, so a name in it can already be a
symlink, a FIFO or a huge file. Reads open regular files only (never through a link) and stop at a
bound; writes go to a temp file created exclusively beside the target (``O_CREAT|O_EXCL|O_NOFOLLOW``:
a planted link or file at the temp name makes creation fail instead of writing through it) and are
renamed over the target only when the target is not a link. Standard library only: the device side and
the workstation side both import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from edge_runtime.errors import ModelDirError

PathLike = Union[str, Path]
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_regular(path: PathLike) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file and not a symlink.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer) so that fstat can
    refuse it; O_NOFOLLOW refuses a symlink, which could point outside the folder.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never even open a device, FIFO or symlink
            raise ModelDirError(f"{path} is not a regular file")
        fd = os.open(path, flags)  # O_NOFOLLOW + fstat: the same check, free of a swap in between
    except FileNotFoundError:
        raise ModelDirError(f"{path} is missing") from None
    except OSError as error:
        raise ModelDirError(f"{path}: cannot open ({error.strerror or error}; symlinks are refused)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelDirError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bounded(path: PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``ModelDirError`` otherwise)."""
    with open_regular(path) as handle:
        if os.fstat(handle.fileno()).st_size > limit:  # refused before a byte is read
            raise ModelDirError(f"{path} is larger than {limit} bytes")
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew while we read it
        raise ModelDirError(f"{path} is larger than {limit} bytes")
    return data


def sha256_of(path: PathLike) -> str:
    """Hex sha256 of a regular file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open_regular(Path(path)) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def create_exclusive(path: PathLike, mode: int = 0o666) -> int:
    """A write-only fd of a new file at ``path``; fails if anything (a link included) is already there."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode & ~_umask())


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise OSError(f"{path} is a symbolic link; refusing to replace it")


def _refuse_folder(path: Path) -> None:
    """A write target must name a file: ``.``, ``/``, ``..`` or an existing folder is said, not a
    ValueError from ``with_name`` or a rename that fails after the temp file was written."""
    if path.name in ("", ".", "..") or (path.is_dir() and not path.is_symlink()):
        raise OSError(f"{path} is a folder, not a file name")


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[BinaryIO]:
    """``with atomic_writer(p) as f: f.write(...)``: ``p`` gets all of it or keeps what it had.

    The temp file ``.NAME.RANDOM.tmp`` is created exclusively in the target's folder (a planted link
    cannot redirect it), removed on any failure, and renamed over ``path`` only if ``path`` is not a
    symlink. The target's name ends the temp's, so ``np.save``-style writers that add a suffix are not
    needed: write to the handle.
    """
    path = Path(path)
    _refuse_folder(path)
    _refuse_link(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = create_exclusive(temp)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _refuse_link(path)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically through an exclusively created temp file."""
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def new_temp_dir_beside(target: PathLike, tag: str = "tmp") -> Path:
    """A new, empty folder ``.NAME.TAG-RANDOM`` beside ``target`` (created exclusively by mkdir)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
    temp.mkdir()  # mkdir never follows a link and fails if anything is there
    return temp


def replace_dir(temp: PathLike, target: PathLike) -> None:
    """Swap a finished folder in; the previous one is removed only after the new one is in place."""
    temp, target = Path(temp), Path(target)
    _refuse_link(target)
    if not target.exists():
        os.replace(temp, target)
        return
    old = new_temp_dir_beside(target, "old")
    os.rmdir(old)  # reserve a fresh name, then rename the previous folder onto it
    os.replace(target, old)
    try:
        os.replace(temp, target)
    except BaseException:
        os.replace(old, target)  # put the previous folder back: nothing already written is lost
        raise
    shutil.rmtree(old, ignore_errors=True)
