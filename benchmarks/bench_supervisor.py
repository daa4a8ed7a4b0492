"""Run one benchmark process on the device, bounded in time and tied to the connection that started it.

Copied to the device beside ``device_facts_probe.py`` and run there with the device's Python
(standard library only)::

    exec python3 bench_supervisor.py --timeout 120 -- python3 -m edge_runtime bench MODEL --json ...

It prints one JSON object: the command's exit code, whether it timed out, its stdout and the tail of
its stderr, and the device temperature before and after. Why a supervisor rather than a plain
``ssh host cmd``: closing an SSH channel does not kill a command that has no PTY, so a benchmark
would keep eating the Pi's CPU after a Ctrl-C or a dropped connection. The supervisor

- runs the command in its own process group and kills the whole group on timeout;
- notices that whoever started it has gone — its parent or grandparent (coreutils ``timeout`` and
  sshd's session process on a device, the harness locally) exited or was re-parented — and kills
  the group;
- kills the group when it is itself sent SIGTERM, SIGHUP or SIGINT;
- keeps a bounded part of what the command prints (the head of stdout, the tail of stderr), so a
  command printing without end fills neither the device's memory nor the workstation's; the JSON
  says when stdout was cut (``stdout_cut``) and stderr's last line says so too.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

try:  # shipped beside this file; the temperature is a nice-to-have, never a reason to fail
    from device_facts_probe import max_temperature_c, throttled_flags
except ImportError:  # pragma: no cover - only when the probe was not copied
    def max_temperature_c() -> Optional[float]:
        return None

    def throttled_flags() -> Optional[int]:
        return None

STDERR_TAIL = 4000  # characters of stderr worth sending back: the end of a traceback
STDOUT_LIMIT = 1 << 20  # bytes of stdout kept: a bench report is a few KiB, so more is not one
DRAIN_S = 1.0  # how long output is still read once the command has ended (or was killed)
POLL_S = 0.25  # light enough not to disturb the benchmark it watches


def parent_of(pid: int) -> Optional[int]:
    """The parent pid of ``pid`` from /proc (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    return int(stat.rpartition(")")[2].split()[1])


def lineage(depth: int = 2) -> List[Tuple[int, Optional[int]]]:
    """(pid, parent) pairs from this process up ``depth`` generations, stopping at init."""
    pairs: List[Tuple[int, Optional[int]]] = []
    pid = os.getpid()
    for _ in range(depth):
        parent = parent_of(pid) if os.path.isdir("/proc") else os.getppid()
        pairs.append((pid, parent))
        if not parent or parent <= 1:
            break
        pid = parent
    return pairs


def still_attached(pairs: List[Tuple[int, Optional[int]]]) -> bool:
    """Whether every recorded ancestor still has the same parent (none died or was re-parented)."""
    if not os.path.isdir("/proc"):
        return os.getppid() == pairs[0][1]
    return all(parent_of(pid) == parent for pid, parent in pairs)


def kill_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the command's process group, then SIGKILL whatever is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class KeptOutput:
    """A bounded part of one output stream: its first ``limit`` bytes, or its last (``tail``)."""

    def __init__(self, limit: int, tail: bool) -> None:
        self.limit, self.tail = limit, tail
        self.kept = bytearray()
        self.total = 0  # bytes the command printed, kept or not

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.tail:
            self.kept += chunk
            del self.kept[:max(len(self.kept) - self.limit, 0)]
        else:
            self.kept += chunk[:max(self.limit - len(self.kept), 0)]

    @property
    def cut(self) -> bool:
        return self.total > len(self.kept)


def read_ready(streams: Dict[int, KeptOutput], wait_s: float) -> None:
    """Read what the command's pipes hold (waiting up to ``wait_s``); a pipe at its end is dropped."""
    if not streams:
        time.sleep(wait_s)
        return
    ready, _, _ = select.select(list(streams), [], [], wait_s)
    for fd in ready:
        chunk = os.read(fd, 1 << 16)
        if chunk:
            streams[fd].add(chunk)
        else:
            del streams[fd]


def supervise(command: List[str], timeout_s: float, grace_s: float) -> dict:
    """Run ``command`` to completion or until ``timeout_s``; return what happened as a dict."""
    ancestors = lineage()
    temperature_before = max_temperature_c()
    out, err = KeptOutput(STDOUT_LIMIT, tail=False), KeptOutput(STDERR_TAIL * 4, tail=True)
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    streams = {process.stdout.fileno(): out, process.stderr.fileno(): err}

    def on_signal(signum: int, _frame: object) -> None:
        kill_group(process, grace_s)
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)

    timed_out = False
    while process.poll() is None:
        if not still_attached(ancestors):  # whoever started us is gone: nobody will read the result
            kill_group(process, grace_s)
            sys.exit(129)
        if time.monotonic() - started > timeout_s:
            timed_out = True
            kill_group(process, grace_s)
            break
        read_ready(streams, POLL_S)
    wall_s = time.monotonic() - started
    drain_until = time.monotonic() + DRAIN_S  # a child the command left behind may hold the pipes open
    while streams and time.monotonic() < drain_until:
        read_ready(streams, max(drain_until - time.monotonic(), 0))
    process.stdout.close()
    process.stderr.close()
    stderr = err.kept.decode("utf-8", "replace")
    if out.cut:
        stderr += (f"\nbench_supervisor: stdout cut at {STDOUT_LIMIT >> 20} MiB (the command printed "
                   f"{out.total / (1 << 20):.1f} MiB; a bench report is a few KiB)")
    return {
        "returncode": process.returncode,
        "timed_out": timed_out,
        "wall_s": round(wall_s, 3),
        "stdout": out.kept.decode("utf-8", "replace"),
        "stdout_cut": out.cut,
        "stderr": stderr[-STDERR_TAIL:],
        "temperature_c_before": temperature_before,
        "temperature_c_after": max_temperature_c(),
        "throttled_after": throttled_flags(),
    }


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description="run one benchmark command, bounded and cleaned up")
    parser.add_argument("--timeout", type=float, required=True, help="seconds before the command is killed")
    parser.add_argument("--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    try:
        result = supervise(command, args.timeout, args.grace)
    except OSError as error:  # the command could not start at all (no such python, ...)
        result = {"returncode": 127, "timed_out": False, "wall_s": 0.0, "stdout": "",
                  "stderr": f"cannot start {command[0]}: {error}", "temperature_c_before": None,
                  "temperature_c_after": None, "throttled_after": None}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
