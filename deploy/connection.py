"""One SSH connection to one device: the only way edgeprune touches a remote machine.

Everything remote goes through :class:`Device` so that quoting (``shlex``), time limits (coreutils
``timeout`` on the device), host-key policy (OpenSSH's ``known_hosts``, ``accept-new``) and error
messages live in one place. Deploy and the bench harness both use it::

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
import re
import secrets
import shlex
import socket
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import paramiko

from deploy.errors import (
    AuthError,
    ConnectError,
    DeployError,
    ConnectionLost,
    HostKeyError,
    RemoteCommandError,
    RemoteTimeout,
    UploadError,
)
from deploy.host_keys import KnownHostsPolicy, prefer_key_types, read_known_hosts
from deploy.remote_command import (  # noqa: F401  (CommandResult, RemoteProcess: part of this module's API)
    LOST,
    CommandResult,
    RemoteProcess,
    command_line,
    quietly as _quietly,
    watch_exit_signals,
)

#: Called with the number of bytes just sent (so ``tqdm.update`` fits as it is).
Progress = Callable[[int], None]

# A step with no overall deadline (an upload: each of its SFTP requests has one).
_NO_DEADLINE = math.inf

_LOST = LOST

_HOST_RE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s\[\]]+)(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class HostSpec:
    """What the user typed: ``[USER@]HOST[:PORT]`` (HOST may be an alias from ``~/.ssh/config``)."""

    host: str
    user: Optional[str] = None
    port: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "HostSpec":
        """Parse ``[user@]host[:port]``; ``[v6addr]:port`` works too. Raises ConnectError if malformed."""
        match = _HOST_RE.match(text.strip())
        if not match:
            raise ConnectError(f"not a host: {text!r} (expected [USER@]HOST[:PORT])")
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 0 < port < 65536:
            raise ConnectError(f"not a port: {port} in {text!r}")
        return cls(host=match["host"].strip("[]"), user=match["user"], port=port)

    def __str__(self) -> str:
        text = f"{self.user}@{self.host}" if self.user else self.host
        return f"{text}:{self.port}" if self.port else text


@dataclass
class ConnectOptions:
    """How to connect: the command-line flags shared by deploy, ls, rollback and bench.

    ``identity_file``: use only this key (like ``ssh -i`` with ``IdentitiesOnly``); without it the
    ssh-agent, ``~/.ssh/config``'s IdentityFile and the default keys are tried, as OpenSSH does.
    ``known_hosts``: an extra known_hosts file, checked besides ``~/.ssh/known_hosts``; new keys
    accepted with ``accept_new_host_key`` are recorded in it (else in ``~/.ssh/known_hosts``).
    """

    identity_file: Optional[Path] = None
    known_hosts: Optional[Path] = None
    accept_new_host_key: bool = False
    #: How long the device may take to answer any one step (the whole connect included): past it the
    #: device counts as hung and the connection is cut (see Device). Quiet commands are kept alive
    #: with a keepalive after this long without a word, like ServerAliveInterval.
    timeout: float = 15.0
    command_timeout: float = 900.0  # default limit for one remote command
    ssh_config: Optional[Path] = field(default_factory=lambda: Path("~/.ssh/config").expanduser())
    user_known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())


@dataclass
class _Target:
    """Where to connect after ``~/.ssh/config`` has had its say."""

    label: str
    hostname: str
    port: int
    user: str
    key_files: list
    identities_only: bool
    proxy_jump: Optional[str]


def _resolve(spec: HostSpec, options: ConnectOptions) -> _Target:
    """Apply ``~/.ssh/config`` (HostName, User, Port, IdentityFile, IdentitiesOnly, ProxyJump)."""
    config: dict = {}
    if options.ssh_config is not None and Path(options.ssh_config).expanduser().is_file():
        try:
            config = paramiko.SSHConfig.from_path(str(Path(options.ssh_config).expanduser())).lookup(spec.host)
        except (paramiko.SSHException, OSError, ValueError) as error:
            raise ConnectError(f"cannot read {options.ssh_config}: {error}") from None
    user = spec.user or config.get("user") or os.environ.get("USER") or _local_user()
    port = spec.port or int(config.get("port", 22))
    if options.identity_file is not None:
        key_files, only = [str(Path(options.identity_file).expanduser())], True
    else:
        key_files = [str(Path(p).expanduser()) for p in config.get("identityfile", [])]
        only = str(config.get("identitiesonly", "no")).lower() == "yes"
    for key_file in key_files if only else []:
        if not os.access(key_file, os.R_OK):
            raise AuthError(f"cannot read the key {key_file}")
    jump = config.get("proxyjump")
    label = str(HostSpec(spec.host, user, port if port != 22 else None))
    return _Target(label, config.get("hostname", spec.host), port, user, key_files, only,
                   None if jump in (None, "none") else jump)


def _local_user() -> str:
    import getpass

    return getpass.getuser()


def temp_stamp() -> str:
    """A suffix for temporary names on the device: process, thread and milliseconds, so that two deploys
    (or two threads of one fleet deploy reaching one device under two names) never pick the same one."""
    return f"{os.getpid()}-{threading.get_ident()}-{int(time.time() * 1000)}"


class Device:
    """An open SSH connection to one device: run commands, upload files, rename atomically.

    Deadlines: the device must answer every step (connecting, opening a channel or the SFTP
    session, starting a command, each SFTP request, a keepalive while a command runs quietly)
    within ``options.timeout``; a device that does not is *hung*: the connection is cut at once, the
    step raises RemoteTimeout, and every later step fails fast. Ctrl-C (KeyboardInterrupt) during a
    step cuts the connection too, without another round trip to the device; the device then ends
    what we started (the deploy lock's holder, :mod:`deploy.root_lock`; bench's supervisor).
    """

    def __init__(self, client: paramiko.SSHClient, label: str, options: ConnectOptions,
                 jump: Optional["Device"] = None):
        self._client = client
        self.label = label  # "user@host[:port]", used in every message
        self.options = options
        self._jump = jump
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._home: Optional[str] = None
        self._lock = threading.Lock()  # opening the SFTP session; never held while closing
        self._hung: Optional[str] = None  # why the connection was cut, once it was
        #: Marks every command started through this connection (see deploy.remote_command).
        self.session_tag = secrets.token_hex(8)

    # ---- connecting -------------------------------------------------------------------------------

    @classmethod
    def connect(cls, spec: HostSpec, options: Optional[ConnectOptions] = None) -> "Device":
        """Open a verified, authenticated connection. Raises ConnectError/HostKeyError/AuthError.

        The whole of it (TCP, banner, key exchange, authentication) must be done in ``options.timeout``.
        """
        options = options or ConnectOptions()
        target = _resolve(spec, options)
        jump = None
        if target.proxy_jump:
            # ProxyJump: a direct-tcpip channel through the jump host stands in for the TCP socket.
            jump_options = ConnectOptions(**{**options.__dict__, "identity_file": None})
            jump = cls.connect(HostSpec.parse(target.proxy_jump.split(",")[0]), jump_options)
            try:
                sock = jump._client.get_transport().open_channel(
                    "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0), timeout=options.timeout)
            except (paramiko.SSHException, OSError) as error:
                jump.close()
                raise ConnectError(f"{target.label}: jump host {target.proxy_jump} cannot reach it: {error}") from None
        else:
            try:
                sock = socket.create_connection((target.hostname, target.port), timeout=options.timeout)
            except BaseException as error:
                raise _connect_error(target, options, error) from None
        client = paramiko.SSHClient()
        # paramiko's own timeouts apply to each phase; this one bounds them all together.
        expired = threading.Event()
        timer = _timer(options.timeout, lambda: (expired.set(), _quietly(sock.close)))
        try:
            entries = read_known_hosts((options.user_known_hosts, options.known_hosts))
            record_in = Path(options.known_hosts or options.user_known_hosts).expanduser()
            policy = KnownHostsPolicy(entries, record_in if options.accept_new_host_key else None)
            client.set_missing_host_key_policy(policy)
            known_types = policy.known_key_types(_known_hosts_name(target))

            def transport_factory(sock, **kwargs) -> paramiko.Transport:
                transport = paramiko.Transport(sock, **kwargs)
                prefer_key_types(transport, known_types)
                return transport

            client.connect(
                target.hostname, port=target.port, username=target.user,
                key_filename=target.key_files or None,
                allow_agent=not target.identities_only, look_for_keys=not target.identities_only,
                timeout=options.timeout, banner_timeout=options.timeout, auth_timeout=options.timeout,
                sock=sock, transport_factory=transport_factory,
            )
        except HostKeyError:
            client.close()
            _quietly(sock.close)
            _close(jump)
            raise
        except BaseException as error:
            client.close()
            _quietly(sock.close)
            _close(jump)
            raise _connect_error(target, options, socket.timeout() if expired.is_set() else error) from None
        finally:
            timer.cancel()
        transport = client.get_transport()
        watch_exit_signals(transport)
        return cls(client, target.label, options, jump)

    def close(self) -> None:
        """Close the SFTP session and the connection (and the jump host's, if any). Idempotent.

        Never waits for another thread: a thread stuck on a hung device must not block Ctrl-C.
        """
        sftp, self._sftp = self._sftp, None
        if sftp is not None:
            _quietly(sftp.close)
        _quietly(self._client.close)
        jump, self._jump = self._jump, None
        _close(jump)

    def abort(self, why: Optional[str] = None) -> None:
        """Cut the connection now, from any thread, without a word to the device (Ctrl-C, a hung device).

        Every step in progress or to come fails at once; ``why`` becomes their RemoteTimeout message.
        """
        if why is not None and self._hung is None:
            self._hung = why
        transport = self._client.get_transport()
        if transport is not None:
            _quietly(transport.close)
        jump = self._jump
        if jump is not None:
            jump.abort()

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _alive(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    @property
    def transport(self) -> paramiko.Transport:
        """The underlying transport (fault-injection tests close it to cut the connection)."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise self.lost("connection lost")
        return transport

    def lost(self, what: str) -> DeployError:
        """The error for a step that failed because the connection is gone: RemoteTimeout if we cut it
        because the device stopped answering, else ConnectionLost."""
        if self._hung is not None:
            return RemoteTimeout(self._hung)
        return ConnectionLost(f"{self.label}: {what}")

    @contextmanager
    def answering(self, what: str, seconds: Optional[float] = None) -> Iterator[None]:
        """A step the device must answer within ``seconds`` (default ``options.timeout``).

        Past the deadline the connection is cut (the step then fails) and RemoteTimeout raised;
        Ctrl-C cuts it too. Socket timeouts inside the step (SFTP's) count as no answer.
        """
        seconds = self.options.timeout if seconds is None else seconds
        why = (f"{self.label}: the device did not answer ({what}) within {seconds:g} s; gave up "
               "(is it hung or overloaded? see --timeout)")
        timer = _timer(seconds, lambda: self.abort(why))
        try:
            yield
        except KeyboardInterrupt:
            self.abort()
            raise
        except socket.timeout:
            self.abort(why)
            raise RemoteTimeout(why) from None
        except DeployError:
            if self._hung is not None:
                raise RemoteTimeout(self._hung) from None
            raise
        except (OSError, *_LOST):
            if self._hung is not None:
                raise RemoteTimeout(self._hung) from None
            raise
        finally:
            timer.cancel()
        if self._hung is not None:
            raise RemoteTimeout(self._hung)

    def keepalive(self) -> None:
        """One round trip that any SSH server answers (OpenSSH's ServerAlive); RemoteTimeout if none comes."""
        with self.answering("keepalive"):
            transport = self.transport
            transport.global_request("keepalive@openssh.com", wait=True)
            if not transport.is_active():
                raise self.lost("connection lost")

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
            except _LOST as error:
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
                    except (OSError, *_LOST) as error:
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
                except (OSError, *_LOST) as error:
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
            except _LOST as error:
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
            except _LOST as error:
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
            except _LOST as error:
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

    def _raise_if_lost(self) -> None:
        if not self._alive():
            raise self.lost("connection lost")

    def read_text(self, remote: str) -> Optional[str]:
        """A small remote file's text, or None if it does not exist."""
        with self.answering(f"SFTP: read {remote}"):
            try:
                with self.sftp.open(remote, "r") as handle:
                    return handle.read().decode("utf-8", errors="replace")
            except FileNotFoundError:
                return None
            except _LOST as error:
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
            except _LOST as error:
                raise self.lost(f"connection lost: {error}") from None
            except OSError as error:
                _quietly(lambda: self.sftp.remove(temp))
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


def _connect_error(target: _Target, options: ConnectOptions, error: BaseException) -> ConnectError:
    """Turn whatever paramiko/socket raised while connecting into one clear line."""
    where = f"{target.label}" + (f" ({target.hostname})" if target.hostname not in target.label else "")
    if isinstance(error, KeyboardInterrupt):
        raise error
    if isinstance(error, paramiko.PasswordRequiredException):
        return AuthError(f"{where}: the key is encrypted; load it into ssh-agent or use an unencrypted key")
    if isinstance(error, paramiko.AuthenticationException):
        keys = ", ".join(target.key_files) or "the agent's and default keys"
        return AuthError(f"{where}: permission denied (tried {keys}); check the user and pass the right key with -i")
    if isinstance(error, (paramiko.ssh_exception.NoValidConnectionsError, ConnectionRefusedError)):
        return ConnectError(f"{where}: connection refused on port {target.port} (is sshd running?)")
    if isinstance(error, socket.gaierror):
        return ConnectError(f"{where}: cannot resolve host name {target.hostname!r}")
    if isinstance(error, (socket.timeout, TimeoutError)):
        return ConnectError(f"{where}: timed out after {options.timeout:g} s (see --timeout)")
    if isinstance(error, FileNotFoundError):
        return AuthError(f"{where}: key file not found: {error.filename}")
    if isinstance(error, (paramiko.SSHException, OSError, EOFError)):
        return ConnectError(f"{where}: {error or type(error).__name__}")
    return ConnectError(f"{where}: {type(error).__name__}: {error}")


def _known_hosts_name(target: _Target) -> str:
    """The name known_hosts records the target under (what paramiko hands the host key policy)."""
    return target.hostname if target.port == 22 else f"[{target.hostname}]:{target.port}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _timer(seconds: float, action: Callable[[], object]) -> threading.Timer:
    """A started daemon timer running ``action`` after ``seconds`` (never, for math.inf); cancel() it."""
    timer = threading.Timer(seconds if math.isfinite(seconds) else 0, action)
    timer.daemon = True
    if math.isfinite(seconds):
        timer.start()
    return timer


def _close(device: Optional[Device]) -> None:
    if device is not None:
        device.close()

