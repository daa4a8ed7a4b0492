"""What to connect to: the host the user typed, the connect flags, and ``~/.ssh/config`` applied.

Nothing here opens a socket: :func:`resolve_target` turns a :class:`HostSpec` and
:class:`ConnectOptions` into an :class:`SshTarget` (host name, port, user, keys, jump host) that
:meth:`deploy.connection.Connection.connect` dials.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import paramiko

from deploy.errors import AuthError, ConnectError

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
    ``known_hosts``: an extra known_hosts file, checked besides ``~/.ssh/known_hosts`` (or the
    config's ``UserKnownHostsFile``); new keys accepted with ``accept_new_host_key`` are recorded in
    it (else in the first user known_hosts file). ``port``: ``-p PORT``, for a host given without one.
    """

    identity_file: Optional[Path] = None
    known_hosts: Optional[Path] = None
    accept_new_host_key: bool = False
    #: How long the device may take to answer any one step (the whole connect included): past it the
    #: device counts as hung and the connection is cut (see Connection). Quiet commands are kept alive
    #: with a keepalive after this long without a word, like ServerAliveInterval.
    timeout: float = 15.0
    command_timeout: float = 900.0  # default limit for one remote command
    ssh_config: Optional[Path] = field(default_factory=lambda: Path("~/.ssh/config").expanduser())
    user_known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    port: Optional[int] = None


@dataclass
class SshTarget:
    """Where to connect after ``~/.ssh/config`` has had its say."""

    label: str
    hostname: str
    port: int
    user: str
    key_files: list
    identities_only: bool
    proxy_jump: Optional[str]
    #: The user's known_hosts files: ``UserKnownHostsFile`` from the config, else ``options.user_known_hosts``.
    user_known_hosts: Tuple[Path, ...] = ()


def resolve_target(spec: HostSpec, options: ConnectOptions) -> SshTarget:
    """Apply ``~/.ssh/config`` (HostName, User, Port, IdentityFile, IdentitiesOnly, ProxyJump,
    UserKnownHostsFile). A port on the command line (``HOST:PORT`` or ``-p``) wins over the config's."""
    config: dict = {}
    if options.ssh_config is not None and Path(options.ssh_config).expanduser().is_file():
        try:
            config = paramiko.SSHConfig.from_path(str(Path(options.ssh_config).expanduser())).lookup(spec.host)
        except (paramiko.SSHException, OSError, ValueError) as error:
            raise ConnectError(f"cannot read {options.ssh_config}: {error}") from None
    user = spec.user or config.get("user") or os.environ.get("USER") or _local_user()
    if spec.port and options.port and spec.port != options.port:
        raise ConnectError(f"{spec}: the port is {spec.port} there but -p says {options.port}; give one")
    port = spec.port or options.port or _config_port(config.get("port"), spec.host)
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
    known = tuple(Path(p).expanduser() for p in str(config.get("userknownhostsfile", "")).split())
    return SshTarget(label, config.get("hostname", spec.host), port, user, key_files, only,
                     None if jump in (None, "none") else jump, known or (Path(options.user_known_hosts),))


def _config_port(text: Optional[str], host: str) -> int:
    """The config's ``Port`` for ``host`` (22 without one); ConnectError if it is not a port."""
    if text is None:
        return 22
    if not str(text).isdigit() or not 0 < int(text) < 65536:
        raise ConnectError(f"{host}: the ssh config's Port {text!r} is not a port")
    return int(text)


def _local_user() -> str:
    import getpass

    return getpass.getuser()


def known_hosts_name(target: SshTarget) -> str:
    """The name known_hosts records the target under (what paramiko hands the host key policy)."""
    return target.hostname if target.port == 22 else f"[{target.hostname}]:{target.port}"
