"""How a command is written for the device's shell, and how its end is read back.

Every remote command is one line for the login shell::

    echo $$; export EDGEPRUNE_SESSION=TAG; cd DIR && exec timeout -k 5 LIMIT ARGV...

- ``echo $$`` prints the pid of the shell that becomes ``timeout`` (the first line is ours, not the
  command's): a sign that the device answered, and what to signal to cancel the command.
- ``EDGEPRUNE_SESSION=TAG`` marks the command and everything it starts with the connection's tag,
  so the deploy lock's holder can end them all before it lets the lock go (:mod:`deploy.root_lock`):
  a command started under the lock never outlives it, even when our client is killed.
- coreutils ``timeout`` kills the command's whole process group at the limit (``-k``: SIGKILL 5 s
  after SIGTERM), enforced on the device even if the connection is gone.

A command killed by a signal ends its channel with SSH's ``exit-signal`` instead of an exit status;
paramiko drops that message, so :func:`watch_exit_signals` records it on the channel.
"""

from __future__ import annotations

import shlex
import signal
from typing import Optional, Sequence

import paramiko

SESSION_VARIABLE = "EDGEPRUNE_SESSION"


def command_line(argv: Sequence[str], limit: float, cwd: Optional[str], tag: Optional[str]) -> str:
    """The shell line that runs ``argv`` on the device (see the module docstring)."""
    command = "exec " + shlex.join(["timeout", "-k", "5", f"{max(limit, 1):.0f}", *map(str, argv)])
    if cwd is not None:
        # After the echo, guarding the exec: a folder that cannot be entered fails the command
        # (non-zero exit, the shell's message on stderr) instead of running it elsewhere.
        command = f"cd {shlex.quote(cwd)} && {command}"
    if tag is not None:
        command = f"export {SESSION_VARIABLE}={shlex.quote(tag)}; {command}"
    return "echo $$; " + command


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


def signal_number(name: str) -> Optional[int]:
    """The local number of a signal named as SSH names it (``"KILL"``), if this system knows it."""
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return None
