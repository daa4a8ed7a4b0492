"""The connection flags `edgeprune deploy`, `ls`, `rollback` (and bench) share, and their errors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.errors import DeployError

if TYPE_CHECKING:  # paramiko loads with deploy.ssh_config: not for `--help`
    from deploy.ssh_config import ConnectOptions

#: What the deploy-side subcommands report as one line + exit code 2.
USER_ERRORS = (DeployError,)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-i``, ``--known-hosts``, ``--accept-new-host-key``, ``-p``, ``-F``, ``--timeout``, ``--python``, ``--remote-root``."""
    group = parser.add_argument_group("connection (like OpenSSH; ~/.ssh/config is honoured)")
    group.add_argument("-i", "--identity-file", type=Path, metavar="KEY",
                       help="private key to use, and only it (default: ssh-agent, ~/.ssh/config, default keys)")
    group.add_argument("--known-hosts", type=Path, metavar="FILE",
                       help="extra known_hosts file, checked besides ~/.ssh/known_hosts; new keys go here")
    group.add_argument("--accept-new-host-key", action="store_true",
                       help="trust and record the key of a host seen for the first time (OpenSSH's "
                            "StrictHostKeyChecking=accept-new); a changed key is always refused")
    group.add_argument("-p", "--port", type=int, metavar="PORT",
                       help="port for hosts given without :PORT (default: ~/.ssh/config's Port, else 22)")
    group.add_argument("-F", "--ssh-config", type=Path, metavar="FILE", default=Path("~/.ssh/config"),
                       help="ssh client configuration (default: ~/.ssh/config)")
    group.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                       help="how long the device may take to answer any one step (connecting, starting a "
                            "command, each SFTP request, a keepalive); past it the device counts as hung and "
                            "the command ends (default: 15)")
    device = parser.add_argument_group("device")
    device.add_argument("--python", default="python3", metavar="PYTHON",
                        help="the device's Python (>= 3.9) the runtime venv is built from (default: python3)")
    device.add_argument("--remote-root", default="~/.edgeprune", metavar="DIR",
                        help="where the runtime and models live on the device (default: ~/.edgeprune)")


def connect_options(args: argparse.Namespace) -> "ConnectOptions":
    """ConnectOptions from the parsed flags."""
    from deploy.ssh_config import ConnectOptions

    if args.timeout <= 0:
        raise DeployError("--timeout must be positive")
    if args.port is not None and not 0 < args.port < 65536:
        raise DeployError(f"-p: not a port: {args.port}")
    return ConnectOptions(identity_file=args.identity_file, known_hosts=args.known_hosts,
                          accept_new_host_key=args.accept_new_host_key, timeout=args.timeout,
                          ssh_config=Path(args.ssh_config).expanduser(), port=args.port)
