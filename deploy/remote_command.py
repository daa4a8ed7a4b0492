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

A started command is a :class:`RemoteProcess` (from :meth:`deploy.device.Device.start`): it
drains stdout and stderr together, gives up on a device that never starts the command or stops
answering keepalives (``--timeout``), and on Ctrl-C cuts the connection without a word to the
device. A command killed by a signal ends its channel with SSH's ``exit-signal`` instead of an exit
status; paramiko drops that message, so :func:`deploy.connection.watch_exit_signals` records it on
the channel and the result names the signal.

A RemoteProcess needs only the :class:`deploy.connection.Connection` it runs on (its deadlines,
keepalive, abort); :mod:`deploy.device` imports this module, never the other way round.
"""

from __future__ import annotations

import select
import shlex
import signal
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import paramiko

from deploy.connection import LOST, Connection, quietly
from deploy.errors import DeployError, RemoteTimeout

SESSION_VARIABLE = "EDGEPRUNE_SESSION"

#: What is kept of each output stream of one command: its first bytes of stdout (where a result
#: starts), its last of stderr (where the error is). A device printing without end must not fill
#: this machine's memory; the rest is read and dropped, and the result says it was cut.
OUTPUT_LIMIT = 8 << 20
_PID_LINE_LIMIT = 64  # `echo $$` prints a few digits; more without a newline is not a pid line


@dataclass(frozen=True)
class CommandResult:
    """What a remote command left behind. ``stdout``/``stderr`` are decoded as UTF-8 (lenient)."""

    argv: tuple
    exit_status: int  # 128 + N when killed by signal N, as a shell reports it
    stdout: str
    stderr: str
    signal: Optional[str] = None  # "KILL", "SEGV"...: the signal that killed it, if one did
    cut: Tuple[str, ...] = ()  # the streams ("stdout", "stderr") that passed OUTPUT_LIMIT and were cut

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and self.signal is None

    def describe(self) -> str:
        """``exit 3`` or ``killed by SIGKILL``: how the command ended, for messages."""
        return f"killed by SIG{self.signal}" if self.signal else f"exit {self.exit_status}"

    def cut_note(self) -> str:
        """One line saying which output was cut ("" when none was)."""
        if not self.cut:
            return ""
        kept = {"stdout": "first", "stderr": "last"}
        return "; ".join(f"the device printed more than {OUTPUT_LIMIT >> 20} MiB on {name}: cut there "
                         f"(only its {kept[name]} {OUTPUT_LIMIT >> 20} MiB kept)" for name in self.cut)


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


def signal_number(name: str) -> Optional[int]:
    """The local number of a signal named as SSH names it (``"KILL"``), if this system knows it."""
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return None


class RemoteProcess:
    """A command started by :meth:`Device.start`: wait for it, or cancel it (kills it on the device)."""

    def __init__(self, device: Connection, argv: tuple, channel: paramiko.Channel, limit: float):
        self.device = device
        self.argv = argv
        self._channel = channel
        self._limit = limit
        self._pid: Optional[int] = None
        self._pid_line = b""
        self._out, self._err = bytearray(), bytearray()
        self._cut: Tuple[str, ...] = ()
        self._started = time.monotonic()
        self._heard = self._started  # when the device last said anything on this channel

    def wait(self) -> CommandResult:
        """Drain stdout and stderr together until the command exits; return its result."""
        channel = self._channel
        # The device's `timeout` kills the command at the limit; the local deadline only guards
        # against a device that stopped answering altogether.
        deadline = self._started + self._limit + self.device.options.timeout + 10
        try:
            while True:
                if time.monotonic() > deadline:
                    self.cancel()
                    raise RemoteTimeout(f"{self.device.label}: `{self.argv[0]}` did not finish in {self._limit:.0f} s")
                got = self._pump(0.2)
                if not got and (channel.exit_status_ready() or channel.closed):
                    break
                self._check_answering()
        except KeyboardInterrupt:
            self.device.abort()  # no round trip: the device ends what we started once we are gone
            raise
        except LOST as error:
            raise self.device.lost(f"connection lost while running {self.argv[0]}: {error}") from None
        return self._result()

    def _pump(self, wait_s: float) -> bool:
        """Read what has arrived (waiting up to ``wait_s`` for something); whether anything came."""
        channel = self._channel
        select.select([channel], [], [], wait_s)
        got = False
        while channel.recv_ready():
            self._take_stdout(channel.recv(65536), self._out)
            got = True
        while channel.recv_stderr_ready():
            self._take_stderr(channel.recv_stderr(65536))
            got = True
        if got:
            self._heard = time.monotonic()
        return got

    def _check_answering(self) -> None:
        """RemoteTimeout once the device is hung: the command never started (no pid line within
        ``options.timeout``), or a quiet command's connection no longer answers a keepalive."""
        device = self.device
        if not device._alive():
            raise device.lost(f"connection lost while running {self.argv[0]}")
        quiet = time.monotonic() - self._heard
        if self._pid is None and quiet > device.options.timeout and not self._channel.exit_status_ready():
            why = (f"{device.label}: the device did not start `{self.argv[0]}` within "
                   f"{device.options.timeout:g} s; gave up (is it hung or overloaded? see --timeout)")
            device.abort(why)
            raise RemoteTimeout(why)
        if quiet > device.options.timeout:
            device.keepalive()  # RemoteTimeout (connection cut) if the device no longer answers
            self._heard = time.monotonic()

    def _result(self) -> CommandResult:
        channel = self._channel
        status = channel.recv_exit_status() if channel.exit_status_ready() else -1
        signal_name = getattr(channel, "exit_signal", None)
        channel.close()
        if status == -1 and signal_name:
            number = signal_number(signal_name)
            status = 128 + number if number else 255  # what a shell reports for a killed command
        elif status == -1:
            raise self.device.lost(f"`{self.argv[0]}` ended without an exit status")
        # `timeout` exits 124 (137 after -k's SIGKILL); only past the limit is that our timeout (an
        # OOM-killed command also exits 137).
        if status in (124, 137) and time.monotonic() - self._started >= self._limit - 0.5:
            raise RemoteTimeout(f"{self.device.label}: `{self.argv[0]}` ran past {self._limit:.0f} s and was killed")
        return CommandResult(self.argv, status, self._out.decode("utf-8", "replace"),
                             self._err.decode("utf-8", "replace"), signal_name, self._cut)

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
                self._pump(0.2)
                self.device._raise_if_lost()
        except KeyboardInterrupt:
            self.device.abort()
            raise
        except LOST as error:
            raise self.device.lost(f"connection lost while running {self.argv[0]}: {error}") from None
        return True

    def exited(self) -> bool:
        """Whether the command has ended (its exit status has arrived)."""
        return self._channel.exit_status_ready()

    def close_stdin(self) -> None:
        """Send EOF on the command's stdin (see ``keep_stdin_open``); harmless on a dead connection."""
        quietly(self._channel.shutdown_write)

    def _take_stdout(self, chunk: bytes, out: bytearray) -> None:
        # The first line is `echo $$` from start(): the pid to signal on cancel, not output.
        if self._pid is None:
            self._pid_line += chunk
            if b"\n" not in self._pid_line and len(self._pid_line) <= _PID_LINE_LIMIT:
                return
            line, newline, rest = self._pid_line.partition(b"\n")
            if not newline:  # no pid line at all (not our shell answering): all of it is output
                line, rest = b"", self._pid_line
            self._pid = int(line) if line.strip().isdigit() else 0
            self._pid_line = b""
            chunk = rest
        room = OUTPUT_LIMIT - len(out)
        if len(chunk) > room:
            self._mark_cut("stdout")
        out += chunk[:max(room, 0)]

    def _take_stderr(self, chunk: bytes) -> None:
        """Keep the last OUTPUT_LIMIT bytes of stderr (an error's last line is what matters)."""
        self._err += chunk
        if len(self._err) > OUTPUT_LIMIT:
            del self._err[:len(self._err) - OUTPUT_LIMIT]
            self._mark_cut("stderr")

    def _mark_cut(self, stream: str) -> None:
        if stream not in self._cut:
            self._cut += (stream,)

    def cancel(self) -> None:
        """Kill the command on the device (SIGTERM to `timeout`, which passes it on) and close.

        Bounded by ``options.timeout`` in all: a device that stopped answering must not hang it.
        """
        device = self.device
        deadline = time.monotonic() + device.options.timeout
        try:
            while self._pid is None and time.monotonic() < deadline and not self._channel.closed:
                # The pid line comes first; wait() may not have read it yet.
                if self._channel.recv_ready():
                    self._take_stdout(self._channel.recv(65536), self._out)
                else:
                    time.sleep(0.01)
            if self._pid and device._alive():
                with device.answering(f"cancelling {self.argv[0]}", seconds=max(deadline - time.monotonic(), 1)):
                    channel = device.transport.open_session(timeout=device.options.timeout)
                    channel.exec_command(f"kill -TERM {self._pid}")
                    while not channel.exit_status_ready():
                        time.sleep(0.02)
                    channel.close()
        except KeyboardInterrupt:
            device.abort()
            raise
        except (DeployError, OSError, *LOST):
            pass
        quietly(self._channel.close)

