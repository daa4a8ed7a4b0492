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

import os
import posixpath
import re
import select
import shlex
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

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
from deploy.host_keys import (
    AcceptNewPolicy,
    RefuseRevokedPolicy,
    RefuseUnknownPolicy,
    fingerprint,
    is_revoked,
    load_known_hosts,
    revoked_message,
)

#: Called with the number of bytes just sent (so ``tqdm.update`` fits as it is).
Progress = Callable[[int], None]

# Exceptions paramiko/sockets raise when an established connection goes away. (Not all of OSError:
# SFTP reports remote file errors as OSError too; those are told apart by asking the transport.)
_LOST = (EOFError, ConnectionError, socket.timeout, paramiko.SSHException)

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
    timeout: float = 15.0  # TCP connect, banner and authentication, each
    command_timeout: float = 900.0  # default limit for one remote command
    io_timeout: float = 60.0  # a stalled SFTP transfer fails after this long
    keepalive: int = 15  # seconds between keepalives (0 = off), like ServerAliveInterval
    ssh_config: Optional[Path] = field(default_factory=lambda: Path("~/.ssh/config").expanduser())
    user_known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())


@dataclass(frozen=True)
class CommandResult:
    """What a remote command left behind. ``stdout``/``stderr`` are decoded as UTF-8 (lenient)."""

    argv: tuple
    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


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
    """An open SSH connection to one device: run commands, upload files, rename atomically."""

    def __init__(self, client: paramiko.SSHClient, label: str, options: ConnectOptions,
                 jump: Optional["Device"] = None):
        self._client = client
        self.label = label  # "user@host[:port]", used in every message
        self.options = options
        self._jump = jump
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._home: Optional[str] = None
        self._lock = threading.Lock()

    # ---- connecting -------------------------------------------------------------------------------

    @classmethod
    def connect(cls, spec: HostSpec, options: Optional[ConnectOptions] = None) -> "Device":
        """Open a verified, authenticated connection. Raises ConnectError/HostKeyError/AuthError."""
        options = options or ConnectOptions()
        target = _resolve(spec, options)
        jump = None
        sock = None
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
        client = paramiko.SSHClient()
        revoked: list = []
        try:
            revoked = load_known_hosts(client, (options.user_known_hosts, options.known_hosts))
            record_in = Path(options.known_hosts or options.user_known_hosts).expanduser()
            client.set_missing_host_key_policy(RefuseRevokedPolicy(
                revoked, AcceptNewPolicy(record_in) if options.accept_new_host_key else RefuseUnknownPolicy()))
            client.connect(
                target.hostname, port=target.port, username=target.user,
                key_filename=target.key_files or None,
                allow_agent=not target.identities_only, look_for_keys=not target.identities_only,
                timeout=options.timeout, banner_timeout=options.timeout, auth_timeout=options.timeout,
                sock=sock,
            )
        except HostKeyError:
            client.close()
            _close(jump)
            raise
        except BaseException as error:
            client.close()
            _close(jump)
            raise _connect_error(target, options, error, revoked) from None
        transport = client.get_transport()
        if options.keepalive:
            transport.set_keepalive(options.keepalive)
        return cls(client, target.label, options, jump)

    def close(self) -> None:
        """Close the SFTP session and the connection (and the jump host's, if any). Idempotent."""
        with self._lock:
            if self._sftp is not None:
                _quietly(self._sftp.close)
                self._sftp = None
            _quietly(self._client.close)
            _close(self._jump)
            self._jump = None

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
            raise ConnectionLost(f"{self.label}: connection lost")
        return transport

    # ---- commands ---------------------------------------------------------------------------------

    def start(self, argv: Sequence[str], timeout: Optional[float] = None, cwd: Optional[str] = None,
              stdin: Optional[bytes] = None, keep_stdin_open: bool = False) -> "RemoteProcess":
        """Start ``argv`` on the device without waiting; see :meth:`run` for the other arguments.

        ``keep_stdin_open``: leave the command's stdin (the SSH channel) open until
        :meth:`RemoteProcess.close_stdin`, so that it can tell when we are done or gone (a lock holder).
        """
        if not argv:
            raise ValueError("empty command")
        limit = self.options.command_timeout if timeout is None else timeout
        # `echo $$; exec timeout ...`: the first stdout line is the pid of `timeout`, which we can
        # signal to cancel (closing a PTY-less channel does not kill the remote process); `timeout`
        # kills the command's whole process group when it runs past the limit, `-k` if TERM is ignored.
        # A `cd` goes after the echo and guards the exec: a folder that cannot be entered fails the
        # command (non-zero exit, the shell's message on stderr) instead of running it elsewhere.
        command = "exec " + shlex.join(["timeout", "-k", "5", f"{max(limit, 1):.0f}", *map(str, argv)])
        if cwd is not None:
            command = f"cd {shlex.quote(cwd)} && {command}"
        command = "echo $$; " + command
        try:
            channel = self.transport.open_session(timeout=self.options.timeout)
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            if not keep_stdin_open:
                channel.shutdown_write()
        except _LOST as error:
            raise ConnectionLost(f"{self.label}: connection lost while starting {argv[0]}: {error}") from None
        return RemoteProcess(self, tuple(map(str, argv)), channel, limit)

    def run(self, argv: Sequence[str], timeout: Optional[float] = None, check: bool = True,
            cwd: Optional[str] = None, stdin: Optional[bytes] = None) -> CommandResult:
        """Run ``argv`` (each item one argument, quoted with shlex) and wait for it.

        ``timeout`` (seconds, default ``options.command_timeout``) is enforced on the device by
        coreutils ``timeout``, which kills the command; RemoteTimeout is raised. With ``check``, a
        non-zero exit raises RemoteCommandError carrying the last stderr line. Stdout and stderr are
        drained together, so large outputs cannot deadlock.
        """
        result = self.start(argv, timeout=timeout, cwd=cwd, stdin=stdin).wait()
        if check and result.exit_status != 0:
            last = _last_line(result.stderr) or _last_line(result.stdout) or "no output"
            raise RemoteCommandError(
                f"{self.label}: `{shlex.join(result.argv)}` failed (exit {result.exit_status}): {last}",
                result.exit_status, result.stderr)
        return result

    # ---- files ------------------------------------------------------------------------------------

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session, opened on first use."""
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = self._client.open_sftp()
                except _LOST as error:
                    raise ConnectionLost(f"{self.label}: cannot open SFTP: {error}") from None
                self._sftp.get_channel().settimeout(self.options.io_timeout)
            return self._sftp

    def home(self) -> str:
        """The remote user's home directory (where SFTP starts)."""
        if self._home is None:
            try:
                self._home = self.sftp.normalize(".")
            except (OSError, *_LOST) as error:
                raise ConnectionLost(f"{self.label}: cannot find the home directory: {error}") from None
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
        """Upload one file to the absolute path ``remote`` (its directory must exist)."""
        sent = [0]

        def callback(done: int, _total: int) -> None:
            if progress is not None:
                progress(done - sent[0])
            sent[0] = done

        try:
            self.sftp.put(str(local), remote, callback=callback, confirm=True)
        except _LOST as error:
            raise ConnectionLost(f"{self.label}: connection lost while uploading {Path(local).name}: {error}") from None
        except OSError as error:
            if not self._alive():
                raise ConnectionLost(f"{self.label}: connection lost while uploading {Path(local).name}") from None
            # OpenSSH's sftp-server reports ENOSPC and friends as a bare "Failure".
            raise UploadError(f"{self.label}: cannot write {remote}: {error.strerror or error} "
                              "(is the disk full or the folder not writable?)") from None

    def put_dir(self, local_dir: Path, remote_dir: str, progress: Optional[Progress] = None) -> None:
        """Upload a folder tree into ``remote_dir`` (created if missing, parents must exist)."""
        local_dir = Path(local_dir)
        self.mkdir(remote_dir)
        for path in sorted(local_dir.rglob("*")):
            target = posixpath.join(remote_dir, path.relative_to(local_dir).as_posix())
            if path.is_dir():
                self.mkdir(target)
            elif path.is_file():
                self.put(path, target, progress)

    def mkdir(self, remote: str) -> None:
        """Create a remote folder (no error if it exists)."""
        try:
            self.sftp.mkdir(remote)
        except OSError:
            if not self.is_dir(remote):
                raise UploadError(f"{self.label}: cannot create folder {remote}") from None

    def is_dir(self, remote: str) -> bool:
        """Whether ``remote`` is an existing folder (following links)."""
        try:
            return stat.S_ISDIR(self.sftp.stat(remote).st_mode)
        except FileNotFoundError:
            return False
        except _LOST as error:
            raise ConnectionLost(f"{self.label}: connection lost: {error}") from None

    def readlink(self, remote: str) -> Optional[str]:
        """A symlink's target, or None if ``remote`` does not exist or is not a link."""
        try:
            return self.sftp.readlink(remote)
        except OSError:
            self._raise_if_lost()
            return None

    def listdir(self, remote: str) -> list:
        """Names in a remote folder ([] if it does not exist)."""
        try:
            return self.sftp.listdir(remote)
        except FileNotFoundError:
            return []
        except _LOST as error:
            raise ConnectionLost(f"{self.label}: connection lost: {error}") from None

    def rename(self, source: str, target: str) -> None:
        """POSIX rename on the device (atomic; replaces a file target, fails on a non-empty folder)."""
        try:
            self.sftp.posix_rename(source, target)
        except OSError as error:
            self._raise_if_lost()
            raise UploadError(f"{self.label}: cannot rename {source} to {target}: {error}") from None

    def _raise_if_lost(self) -> None:
        if not self._alive():
            raise ConnectionLost(f"{self.label}: connection lost")

    def read_text(self, remote: str) -> Optional[str]:
        """A small remote file's text, or None if it does not exist."""
        try:
            with self.sftp.open(remote, "r") as handle:
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except _LOST as error:
            raise ConnectionLost(f"{self.label}: connection lost: {error}") from None

    def write_text(self, remote: str, text: str) -> None:
        """Write a small remote file atomically (temp file, then POSIX rename over the target)."""
        temp = f"{remote}.tmp-{temp_stamp()}"
        try:
            with self.sftp.open(temp, "w") as handle:
                handle.write(text.encode("utf-8"))
            self.sftp.posix_rename(temp, remote)
        except _LOST as error:
            raise ConnectionLost(f"{self.label}: connection lost: {error}") from None
        except OSError as error:
            _quietly(lambda: self.sftp.remove(temp))
            raise UploadError(f"{self.label}: cannot write {remote}: {error}") from None


class RemoteProcess:
    """A command started by :meth:`Device.start`: wait for it, or cancel it (kills it on the device)."""

    def __init__(self, device: Device, argv: tuple, channel: paramiko.Channel, limit: float):
        self.device = device
        self.argv = argv
        self._channel = channel
        self._limit = limit
        self._pid: Optional[int] = None
        self._pid_line = b""
        self._out, self._err = bytearray(), bytearray()
        self._started = time.monotonic()

    def wait(self) -> CommandResult:
        """Drain stdout and stderr together until the command exits; return its result."""
        channel = self._channel
        out, err = self._out, self._err
        # The device's `timeout` kills the command at the limit; the local deadline only guards
        # against a device that stopped answering altogether.
        deadline = time.monotonic() + self._limit + self.device.options.timeout + 10
        try:
            while True:
                if time.monotonic() > deadline:
                    self.cancel()
                    raise RemoteTimeout(f"{self.device.label}: `{self.argv[0]}` did not finish in {self._limit:.0f} s")
                select.select([channel], [], [], 0.2)
                got = False
                while channel.recv_ready():
                    self._take_stdout(channel.recv(65536), out)
                    got = True
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                    got = True
                if not got and channel.exit_status_ready():
                    break
                if not got and channel.closed:
                    break
                if not self.device._client.get_transport() or not self.device._client.get_transport().is_active():
                    raise ConnectionLost(f"{self.device.label}: connection lost while running {self.argv[0]}")
        except KeyboardInterrupt:
            self.cancel()
            raise
        except _LOST as error:
            raise ConnectionLost(f"{self.device.label}: connection lost while running {self.argv[0]}: {error}") from None
        status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        channel.close()
        if status == -1:
            raise ConnectionLost(f"{self.device.label}: `{self.argv[0]}` ended without an exit status")
        # `timeout` exits 124 (137 after -k's SIGKILL); only past the limit is that our timeout (an
        # OOM-killed command also exits 137).
        if status in (124, 137) and time.monotonic() - self._started >= self._limit - 0.5:
            raise RemoteTimeout(f"{self.device.label}: `{self.argv[0]}` ran past {self._limit:.0f} s and was killed")
        return CommandResult(self.argv, status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def read_until(self, text: str, timeout: float) -> bool:
        """Read output until stdout holds ``text`` (True), or the command exits or ``timeout`` passes (False).

        What was read stays for :meth:`wait`. ConnectionLost if the connection drops meanwhile.
        """
        channel, wanted = self._channel, text.encode()
        deadline = time.monotonic() + timeout
        try:
            while wanted not in self._out:
                if time.monotonic() > deadline or (channel.exit_status_ready() and not channel.recv_ready()):
                    return False
                select.select([channel], [], [], 0.2)
                while channel.recv_ready():
                    self._take_stdout(channel.recv(65536), self._out)
                while channel.recv_stderr_ready():
                    self._err += channel.recv_stderr(65536)
                self.device._raise_if_lost()
        except _LOST as error:
            raise ConnectionLost(f"{self.device.label}: connection lost while running {self.argv[0]}: {error}") from None
        return True

    def exited(self) -> bool:
        """Whether the command has ended (its exit status has arrived)."""
        return self._channel.exit_status_ready()

    def close_stdin(self) -> None:
        """Send EOF on the command's stdin (see ``keep_stdin_open``); harmless on a dead connection."""
        _quietly(self._channel.shutdown_write)

    def _take_stdout(self, chunk: bytes, out: bytearray) -> None:
        # The first line is `echo $$` from start(): the pid to signal on cancel, not output.
        if self._pid is None:
            self._pid_line += chunk
            if b"\n" not in self._pid_line:
                return
            line, _, rest = self._pid_line.partition(b"\n")
            self._pid = int(line) if line.strip().isdigit() else 0
            out += rest
        else:
            out += chunk

    def cancel(self) -> None:
        """Kill the command on the device (SIGTERM to `timeout`, which passes it on) and close."""
        deadline = time.monotonic() + 5
        while self._pid is None and time.monotonic() < deadline and not self._channel.closed:
            # The pid line comes first; wait() may not have read it yet.
            if self._channel.recv_ready():
                self._take_stdout(self._channel.recv(65536), self._out)
            else:
                time.sleep(0.01)
        if self._pid:
            try:
                channel = self.device.transport.open_session(timeout=5)
                channel.exec_command(f"kill -TERM {self._pid}")
                # Bounded: a device that stopped answering must not hang the cancel (or Ctrl-C).
                answered_by = time.monotonic() + 5
                while not channel.exit_status_ready() and time.monotonic() < answered_by:
                    time.sleep(0.02)
                channel.close()
            except (DeployError, *_LOST):
                pass
        _quietly(self._channel.close)


def _connect_error(target: _Target, options: ConnectOptions, error: BaseException,
                   revoked: Sequence = ()) -> ConnectError:
    """Turn whatever paramiko/socket raised while connecting into one clear line."""
    where = f"{target.label}" + (f" ({target.hostname})" if target.hostname not in target.label else "")
    if isinstance(error, paramiko.BadHostKeyException) and is_revoked(list(revoked), _known_hosts_name(target),
                                                                      error.key):
        return HostKeyError(revoked_message(where, error.key))
    if isinstance(error, paramiko.BadHostKeyException):
        return HostKeyError(
            f"{where}: HOST KEY CHANGED: the server offered {error.key.get_name()} {fingerprint(error.key)} but "
            f"known_hosts records {fingerprint(error.expected_key)}; refusing (someone may be impersonating "
            "the device). If the device was reinstalled, remove its old line from known_hosts "
            f"(ssh-keygen -R '{_known_hosts_name(target)}')")
    if isinstance(error, paramiko.PasswordRequiredException):
        return AuthError(f"{where}: the key is encrypted; load it into ssh-agent or use an unencrypted key")
    if isinstance(error, paramiko.AuthenticationException):
        keys = ", ".join(target.key_files) or "the agent's and default keys"
        return AuthError(f"{where}: permission denied (tried {keys}); check the user and pass the right key with -i")
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
        return ConnectError(f"{where}: connection refused on port {target.port} (is sshd running?)")
    if isinstance(error, socket.gaierror):
        return ConnectError(f"{where}: cannot resolve host name {target.hostname!r}")
    if isinstance(error, (socket.timeout, TimeoutError)):
        return ConnectError(f"{where}: timed out after {options.timeout:.0f} s")
    if isinstance(error, FileNotFoundError):
        return AuthError(f"{where}: key file not found: {error.filename}")
    if isinstance(error, (paramiko.SSHException, OSError, EOFError)):
        return ConnectError(f"{where}: {error or type(error).__name__}")
    if isinstance(error, KeyboardInterrupt):
        raise error
    return ConnectError(f"{where}: {type(error).__name__}: {error}")


def _known_hosts_name(target: _Target) -> str:
    return target.hostname if target.port == 22 else f"[{target.hostname}]:{target.port}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways; nothing to do
        pass


def _close(device: Optional[Device]) -> None:
    if device is not None:
        device.close()

