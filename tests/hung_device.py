"""Hung "devices" for tests: real sshd instances whose SFTP, or whose commands, never answer.

- ``sftp``: the SFTP subsystem is a process that sleeps (an sftp-server stuck on a dead SD card);
  connecting, authenticating and commands work.
- ``commands``: every command sleeps instead of running (``ForceCommand``), SFTP works (a device too
  loaded or too broken to start anything).

The sleeping process carries a marker in its command line (``hung_marker``) so that tests can tell
when edgeprune is stuck on it and remove it afterwards: it belongs to the hung device, not to us.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Sequence

from tests.sshd import SshdFactory, SshServer

SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
MODES = ("sftp", "commands")


class HungServer(NamedTuple):
    server: SshServer
    marker: str  # in the command line of every process that hangs on purpose


def start_hung_server(factory: SshdFactory, mode: str, folder: Path) -> HungServer:
    """A real sshd (listed in the factory's known_hosts) whose SFTP or commands hang (see module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = str(folder / f"hung-{mode}")
    hang = folder / f"hang-{mode}"
    hang.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import time; time.sleep(3600)" {marker}\n')
    hang.chmod(0o755)
    if mode == "sftp":
        config = [f"Subsystem sftp {hang}"]
    else:
        force = folder / "force-command"
        force.write_text(f'#!/bin/sh\ncase "$SSH_ORIGINAL_COMMAND" in\n  {SFTP_SERVER}) exec {SFTP_SERVER} ;;\n'
                         f"esac\nexec {hang}\n")
        force.chmod(0o755)
        config = [f"Subsystem sftp {SFTP_SERVER}", f"ForceCommand {force}"]
    return HungServer(factory.start(config=config), marker)


def pids_with_environment(text: str) -> List[int]:
    """Pids of processes whose environment holds ``text`` (e.g. ``EDGEPRUNE_SESSION=``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class Ended(NamedTuple):
    code: int
    err: str
    seconds: float  # from the signal (SIGINT runs) or from the start (timeout runs) to the exit


def run_cli(args: Sequence[str], home: Path, timeout: float = 120) -> Ended:
    """``python -m edgeprune ARGS`` in its own process, with HOME in a temp dir; how and when it ended."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "edgeprune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL)
    return Ended(done.returncode, done.stderr, time.monotonic() - started)


def interrupt_cli(args: Sequence[str], home: Path, stuck, timeout: float = 120) -> Ended:
    """Start ``edgeprune ARGS``, wait until ``stuck()`` says it hangs, send SIGINT; how long it took to end."""
    process = subprocess.Popen([sys.executable, "-m", "edgeprune", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                               env={**os.environ, "HOME": str(home)})
    try:
        deadline = time.monotonic() + timeout
        while not stuck():
            if process.poll() is not None or time.monotonic() > deadline:
                _, err = process.communicate(timeout=10)
                raise AssertionError(f"edgeprune never got stuck on the hung device (exit {process.returncode}): {err}")
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the blocking call, not on its way there
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=timeout)
        return Ended(process.returncode, err, time.monotonic() - sent)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
