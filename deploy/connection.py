"""One SSH connection to one device: connecting, host keys, and telling a hung device from a slow one.

:class:`Connection` opens a verified, authenticated connection (``~/.ssh/config`` applied by
:mod:`deploy.ssh_config`, host keys checked as OpenSSH does by :mod:`deploy.host_keys`, a ProxyJump
through the jump host) and owns its deadlines: every step must be answered within
``options.timeout`` (:meth:`Connection.answering`), else the connection is cut and the step raises
RemoteTimeout. What runs over it, commands and files, is the job of :class:`deploy.device.Device`
(a Connection with commands and SFTP). :class:`deploy.remote_command.RemoteProcess` needs only this
class, so ``deploy.device`` imports ``deploy.remote_command`` and never the other way round.
"""

from __future__ import annotations

import math
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Type, TypeVar

import paramiko

from deploy.errors import AuthError, ConnectError, ConnectionLost, DeployError, HostKeyError, RemoteTimeout
from deploy.host_keys import KnownHostsPolicy, prefer_key_types, read_known_hosts
from deploy.ssh_config import ConnectOptions, HostSpec, SshTarget, known_hosts_name, resolve_target


# Exceptions paramiko/sockets raise when an established connection goes away. (Not all of OSError:
# SFTP reports remote file errors as OSError too; those are told apart by asking the transport.)
LOST = (EOFError, ConnectionError, socket.timeout, paramiko.SSHException)

_Self = TypeVar("_Self", bound="Connection")


class Connection:
    """An open, verified SSH connection to one device, with its deadlines.

    Deadlines: the device must answer every step (connecting, opening a channel or the SFTP
    session, starting a command, each SFTP request, a keepalive while a command runs quietly)
    within ``options.timeout``; a device that does not is *hung*: the connection is cut at once, the
    step raises RemoteTimeout, and every later step fails fast. Ctrl-C (KeyboardInterrupt) during a
    step cuts the connection too, without another round trip to the device; the device then ends
    what we started (the deploy lock's holder, :mod:`deploy.root_lock`; bench's supervisor).
    """

    def __init__(self, client: paramiko.SSHClient, label: str, options: ConnectOptions,
                 jump: Optional["Connection"] = None):
        self._client = client
        self.label = label  # "user@host[:port]", used in every message
        self.options = options
        self._jump = jump
        self._hung: Optional[str] = None  # why the connection was cut, once it was

    @classmethod
    def connect(cls: Type[_Self], spec: HostSpec, options: Optional[ConnectOptions] = None) -> _Self:
        """Open a verified, authenticated connection. Raises ConnectError/HostKeyError/AuthError.

        The whole of it (TCP, banner, key exchange, authentication) must be done in ``options.timeout``.
        """
        options = options or ConnectOptions()
        target = resolve_target(spec, options)
        jump = None
        if target.proxy_jump:
            # ProxyJump: a direct-tcpip channel through the jump host stands in for the TCP socket.
            jump_options = ConnectOptions(**{**options.__dict__, "identity_file": None, "port": None})
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
        timer = _timer(options.timeout, lambda: (expired.set(), quietly(sock.close)))
        try:
            entries = read_known_hosts((*target.user_known_hosts, options.known_hosts))
            record_in = Path(options.known_hosts or target.user_known_hosts[0]).expanduser()
            policy = KnownHostsPolicy(entries, record_in if options.accept_new_host_key else None)
            client.set_missing_host_key_policy(policy)
            known_types = policy.known_key_types(known_hosts_name(target))

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
            quietly(sock.close)
            _close(jump)
            raise
        except BaseException as error:
            client.close()
            quietly(sock.close)
            _close(jump)
            raise _connect_error(target, options, socket.timeout() if expired.is_set() else error) from None
        finally:
            timer.cancel()
        transport = client.get_transport()
        watch_exit_signals(transport)
        return cls(client, target.label, options, jump)

    def close(self) -> None:
        """Close the connection (and the jump host's, if any). Idempotent.

        Never waits for another thread: a thread stuck on a hung device must not block Ctrl-C.
        """
        quietly(self._client.close)
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
            quietly(transport.close)
        jump = self._jump
        if jump is not None:
            jump.abort()

    def __enter__(self: _Self) -> _Self:
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
        except (OSError, *LOST):
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

    def _raise_if_lost(self) -> None:
        if not self._alive():
            raise self.lost("connection lost")


def _connect_error(target: SshTarget, options: ConnectOptions, error: BaseException) -> ConnectError:
    """Turn whatever paramiko/socket raised while connecting into one clear line."""
    where = f"{target.label}" + (f" ({target.hostname})" if target.hostname not in target.label else "")
    if isinstance(error, KeyboardInterrupt):
        raise error
    if isinstance(error, paramiko.PasswordRequiredException):
        return AuthError(f"{where}: the key is encrypted; load it into ssh-agent or use an unencrypted key")
    if isinstance(error, paramiko.AuthenticationException):
        return AuthError(f"{where}: permission denied (tried {keys_tried(target)}); check the user "
                         "and pass the right key with -i")
    if isinstance(error, paramiko.SSHException) and "No authentication methods" in str(error):
        return AuthError(f"{where}: no key to log in with (tried {keys_tried(target)}); pass one with -i KEY, "
                         "name it in ~/.ssh/config (IdentityFile) or load it into ssh-agent")
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


#: The keys paramiko looks for when no key is named (``look_for_keys``), as OpenSSH's defaults.
DEFAULT_KEYS = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519", "~/.ssh/id_dsa")


def keys_tried(target: SshTarget) -> str:
    """The keys a connection to ``target`` offered, in words: named files, the agent's, the defaults."""
    if target.identities_only:
        return ", ".join(target.key_files)
    tried = list(target.key_files)
    try:
        agent_keys = len(paramiko.Agent().get_keys())
    except (paramiko.SSHException, OSError):
        agent_keys = 0
    tried.append(f"ssh-agent ({agent_keys} key{'s' * (agent_keys != 1)})" if agent_keys else "ssh-agent (none)")
    found = [key for key in DEFAULT_KEYS if Path(key).expanduser().is_file()]
    tried.append(", ".join(found) if found else f"{', '.join(DEFAULT_KEYS)} (none exist)")
    return ", ".join(tried)


def _timer(seconds: float, action: Callable[[], object]) -> threading.Timer:
    """A started daemon timer running ``action`` after ``seconds`` (never, for math.inf); cancel() it."""
    timer = threading.Timer(seconds if math.isfinite(seconds) else 0, action)
    timer.daemon = True
    if math.isfinite(seconds):
        timer.start()
    return timer


def _close(connection: Optional[Connection]) -> None:
    if connection is not None:
        connection.close()


def watch_exit_signals(transport: paramiko.Transport) -> None:
    """Record SSH ``exit-signal`` messages as ``channel.exit_signal`` (e.g. ``"KILL"``) on this transport.

    paramiko answers only ``exit-status``; a command killed by a signal looked as if its connection
    had dropped. The handler table is per transport (a copy), so no other paramiko user is affected.
    """
    table = dict(getattr(type(transport), "_channel_handler_table", {}))
    original = table.get(paramiko.common.MSG_CHANNEL_REQUEST)
    if original is None:  # a paramiko without this table: signals stay unnamed, nothing breaks
        return

    def handle(channel: paramiko.Channel, message: paramiko.Message) -> None:
        start = message.packet.tell()
        if message.get_text() == "exit-signal":
            message.get_boolean()  # want_reply: never set for exit-signal (RFC 4254 6.10)
            channel.exit_signal = message.get_text()
            channel.status_event.set()
            return
        message.packet.seek(start)
        original(channel, message)

    table[paramiko.common.MSG_CHANNEL_REQUEST] = handle
    transport._channel_handler_table = table


def quietly(action: Callable[[], object]) -> None:
    """Run ``action`` (closing something), ignoring what a broken connection makes it raise."""
    try:
        action()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways; nothing to do
        pass
