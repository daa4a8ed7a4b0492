"""Commands and files on one device over SSH: the only way edgeprune touches a remote machine.

Everything remote goes through :class:`Device` so that quoting (``shlex``), time limits (coreutils
``timeout`` on the device), host-key policy (OpenSSH's ``known_hosts``, ``accept-new``) and error
messages live in one place. A Device is a :class:`deploy.connection.Connection` (connecting, host
keys, deadlines) that runs commands (:mod:`deploy.remote_command`) and moves files over SFTP.
Deploy and the bench harness both use it::

    spec = HostSpec.parse("pi@raspberrypi.local:22")
    with Device.connect(spec, ConnectOptions(identity_file=Path("~/.ssh/id_ed25519"))) as device:
        result = device.run(["uname", "-m"])          # argv, never a shell string
        device.put(Path("model.onnx"), "/home/pi/model.onnx", progress=bar.update)

One ``Device`` per host and per thread (paramiko's client is not meant to be shared across threads).
"""

from __future__ import annotations

import math
import os
import posixpath
import secrets
import shlex
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import paramiko

from deploy.connection import LOST, Connection, quietly
from deploy.errors import RemoteCommandError, UploadError
from deploy.remote_command import CommandResult, RemoteProcess, command_line
from deploy.ssh_config import ConnectOptions

#: Called with the number of bytes just sent (so ``tqdm.update`` fits as it is).
Progress = Callable[[int], None]

# A step with no overall deadline (an upload: each of its SFTP requests has one).
_NO_DEADLINE = math.inf


def temp_stamp() -> str:
    """A suffix for temporary names on the device: process, thread and milliseconds, so that two deploys
    (or two threads of one fleet deploy reaching one device under two names) never pick the same one."""
    return f"{os.getpid()}-{threading.get_ident()}-{int(time.time() * 1000)}"


class Device(Connection):
    """An open SSH connection to one device: run commands, upload files, rename atomically.

    Connecting and the deadlines every step here keeps are :class:`deploy.connection.Connection`'s.
    """

    def __init__(self, client: paramiko.SSHClient, label: str, options: ConnectOptions,
                 jump: Optional[Connection] = None):
        super().__init__(client, label, options, jump)
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._home: Optional[str] = None
        self._lock = threading.Lock()  # opening the SFTP session; never held while closing
        #: Marks every command started through this connection (see deploy.remote_command).
        self.session_tag = secrets.token_hex(8)

    def close(self) -> None:
        """Close the SFTP session and the connection (and the jump host's, if any). Idempotent.

        Never waits for another thread: a thread stuck on a hung device must not block Ctrl-C.
        """
        sftp, self._sftp = self._sftp, None
        if sftp is not None:
            quietly(sftp.close)
        super().close()

    # ---- commands ---------------------------------------------------------------------------------

    def start(self, argv: Sequence[str], timeout: Optional[float] = None, cwd: Optional[str] = None,
              stdin: Optional[bytes] = None, keep_stdin_open: bool = False, tagged: bool = True) -> "RemoteProcess":
        """Start ``argv`` on the device without waiting; see :meth:`run` for the other arguments.

        ``keep_stdin_open``: leave the command's stdin (the SSH channel) open until
        :meth:`RemoteProcess.close_stdin`, so that it can tell when we are done or gone (a lock holder).
        ``tagged``: mark it with :attr:`session_tag`, so the deploy lock's holder ends it before
        letting the lock go (off only for the holder itself).
        """
        if not argv:
            raise ValueError("empty command")
        limit = self.options.command_timeout if timeout is None else timeout
        command = command_line(argv, limit, cwd, self.session_tag if tagged else None)
        with self.answering(f"starting {argv[0]}"):
            try:
                channel = self.transport.open_session(timeout=self.options.timeout)
                channel.exec_command(command)
                if stdin:
                    channel.sendall(stdin)
                if not keep_stdin_open:
                    channel.shutdown_write()
            except LOST as error:
                raise self.lost(f"connection lost while starting {argv[0]}: {error}") from None
        return RemoteProcess(self, tuple(map(str, argv)), channel, limit)

    def run(self, argv: Sequence[str], timeout: Optional[float] = None, check: bool = True,
            cwd: Optional[str] = None, stdin: Optional[bytes] = None) -> CommandResult:
        """Run ``argv`` (each item one argument, quoted with shlex) and wait for it.

        ``timeout`` (seconds, default ``options.command_timeout``) is enforced on the device by
        coreutils ``timeout``, which kills the command; RemoteTimeout is raised. With ``check``, a
        non-zero exit (or a signal) raises RemoteCommandError carrying the last stderr line. Stdout
        and stderr are drained together, so large outputs cannot deadlock.
        """
        result = self.start(argv, timeout=timeout, cwd=cwd, stdin=stdin).wait()
        if check and not result.ok:
            last = _last_line(result.stderr) or _last_line(result.stdout) or "no output"
            raise RemoteCommandError(
                f"{self.label}: `{shlex.join(result.argv)}` failed ({result.describe()}): {last}",
                result.exit_status, result.stderr)
        return result

    # ---- files ------------------------------------------------------------------------------------

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session, opened on first use (the device must answer in ``options.timeout``)."""
        with self._lock:
            if self._sftp is None:
                with self.answering("opening SFTP"):
                    try:
                        channel = self.transport.open_session(timeout=self.options.timeout)
                        # Set before the version exchange: an sftp-server that never answers must not
                        # hang SFTPClient's constructor (paramiko's open_sftp() sets no timeout at all).
                        channel.settimeout(self.options.timeout)
                        channel.invoke_subsystem("sftp")
                        self._sftp = paramiko.SFTPClient(channel)
                    except (OSError, *LOST) as error:
                        if isinstance(error, socket.timeout):
                            raise
                        raise self.lost(f"cannot open SFTP: {error}") from None
            return self._sftp

    def home(self) -> str:
        """The remote user's home directory (where SFTP starts)."""
        if self._home is None:
            with self.answering("SFTP: home directory"):
                try:
                    self._home = self.sftp.normalize(".")
                except (OSError, *LOST) as error:
                    if isinstance(error, socket.timeout):
                        raise
                    raise self.lost(f"cannot find the home directory: {error}") from None
        return self._home

    def resolve_path(self, path: str) -> str:
        """Expand a leading ``~`` and make ``path`` absolute (relative paths are under home).

        Remote paths are quoted, never shell-expanded, so ``~`` must be expanded here.
        """
        if path == "~" or path.startswith("~/"):
            path = self.home() + path[1:]
        elif not path.startswith("/"):
            path = posixpath.join(self.home(), path)
        return posixpath.normpath(path)

    def put(self, local: Path, remote: str, progress: Optional[Progress] = None) -> None:
        """Upload one regular file to the absolute path ``remote`` (its directory must exist).

        Each SFTP request must be answered within ``options.timeout`` (the transfer as a whole may
        take as long as the link needs).
        """
        sent = [0]

        def callback(done: int, _total: int) -> None:
            if progress is not None:
                progress(done - sent[0])
            sent[0] = done

        with self.answering(f"uploading {Path(local).name}", seconds=_NO_DEADLINE):
            try:
                self.sftp.put(str(local), remote, callback=callback, confirm=True)
            except socket.timeout:
                raise
            except LOST as error:
                raise self.lost(f"connection lost while uploading {Path(local).name}: {error}") from None
            except OSError as error:
                if not self._alive():
                    raise self.lost(f"connection lost while uploading {Path(local).name}") from None
                # OpenSSH's sftp-server reports ENOSPC and friends as a bare "Failure".
                raise UploadError(f"{self.label}: cannot write {remote}: {error.strerror or error} "
                                  "(is the disk full or the folder not writable?)") from None

    def put_listed(self, local_dir: Path, relatives: Sequence[str], remote_dir: str,
                   progress: Optional[Progress] = None) -> None:
        """Upload exactly the files ``relatives`` (paths inside ``local_dir``) into ``remote_dir``.

        Each must be a regular file inside the folder, reached without symlinks: a shared MODEL_DIR
        must not make us send a file from elsewhere on this machine (UploadError otherwise).
        ``remote_dir`` must exist; sub-folders are created.
        """
        sources = [(relative, regular_file_inside(Path(local_dir), relative)) for relative in relatives]
        made = {remote_dir}
        for relative, source in sources:
            target = posixpath.join(remote_dir, relative)
            parent = posixpath.dirname(target)
            if parent not in made:
                self.run(["mkdir", "-p", parent])
                made.add(parent)
            self.put(source, target, progress)

    def mkdir(self, remote: str) -> None:
        """Create a remote folder (no error if it exists)."""
        with self.answering(f"SFTP: mkdir {remote}"):
            try:
                self.sftp.mkdir(remote)
            except socket.timeout:
                raise
            except OSError:
                if not self.is_dir(remote):
                    raise UploadError(f"{self.label}: cannot create folder {remote}") from None

    def is_dir(self, remote: str) -> bool:
        """Whether ``remote`` is an existing folder (following links)."""
        with self.answering(f"SFTP: stat {remote}"):
            try:
                return stat.S_ISDIR(self.sftp.stat(remote).st_mode)
            except FileNotFoundError:
                return False
            except LOST as error:
                raise self.lost(f"connection lost: {error}") from None

    def readlink(self, remote: str) -> Optional[str]:
        """A symlink's target, or None if ``remote`` does not exist or is not a link."""
        with self.answering(f"SFTP: readlink {remote}"):
            try:
                return self.sftp.readlink(remote)
            except socket.timeout:
                raise
            except OSError:
                self._raise_if_lost()
                return None

    def listdir(self, remote: str) -> list:
        """Names in a remote folder ([] if it does not exist)."""
        with self.answering(f"SFTP: list {remote}"):
            try:
                return self.sftp.listdir(remote)
            except FileNotFoundError:
                return []
            except LOST as error:
                raise self.lost(f"connection lost: {error}") from None

    def rename(self, source: str, target: str) -> None:
        """POSIX rename on the device (atomic; replaces a file target, fails on a non-empty folder)."""
        with self.answering(f"SFTP: rename {source}"):
            try:
                self.sftp.posix_rename(source, target)
            except socket.timeout:
                raise
            except OSError as error:
                self._raise_if_lost()
                raise UploadError(f"{self.label}: cannot rename {source} to {target}: {error}") from None

    def read_text(self, remote: str) -> Optional[str]:
        """A small remote file's text, or None if it does not exist."""
        with self.answering(f"SFTP: read {remote}"):
            try:
                with self.sftp.open(remote, "r") as handle:
                    return handle.read().decode("utf-8", errors="replace")
            except FileNotFoundError:
                return None
            except LOST as error:
                raise self.lost(f"connection lost: {error}") from None

    def write_text(self, remote: str, text: str) -> None:
        """Write a small remote file atomically (temp file, then POSIX rename over the target)."""
        temp = f"{remote}.tmp-{temp_stamp()}"
        with self.answering(f"SFTP: write {remote}"):
            try:
                with self.sftp.open(temp, "w") as handle:
                    handle.write(text.encode("utf-8"))
                self.sftp.posix_rename(temp, remote)
            except socket.timeout:
                raise
            except LOST as error:
                raise self.lost(f"connection lost: {error}") from None
            except OSError as error:
                quietly(lambda: self.sftp.remove(temp))
                raise UploadError(f"{self.label}: cannot write {remote}: {error}") from None


def regular_file_inside(folder: Path, relative: str) -> Path:
    """``folder/relative`` if it is a regular file reached without symlinks; UploadError otherwise."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise UploadError(f"{folder}: refusing to upload {relative!r} (not a plain path inside the folder)")
    path = Path(folder)
    for part in parts:
        path = path / part
        try:
            mode = path.lstat().st_mode
        except OSError as error:
            raise UploadError(f"cannot read {path}: {error.strerror or error}") from None
        if stat.S_ISLNK(mode):
            raise UploadError(f"{folder}: refusing to upload {relative} through the symlink {path.name} "
                              "(only regular files inside the folder are sent)")
    if not stat.S_ISREG(mode):
        raise UploadError(f"{folder}: refusing to upload {relative}: not a regular file")
    return path


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""

