"""Helpers for the distributed tests: launch ``edgeprune compress`` under torchrun and kill it hard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from tests.compressor_fixtures import ENV, REPO

# Tiny digits run (as tests.compressor_fixtures.TINY): dense + 4 levels of 3 epochs each.
TINY_CLI = ["--model", "digits-mlp", "--data", "digits", "--epochs", "3", "--lr-drops", "2",
            "--target-sparsity", "0.55", "--seed", "3", "--no-progress"]


def compress_command(out: Path, nproc: int, resume: bool = False) -> List[str]:
    """``edgeprune compress`` for the tiny run; under torchrun (gloo, CPU) when ``nproc`` > 1."""
    args = ["compress", *TINY_CLI, "--device", "cpu", "--out", str(out)] + (["--resume"] if resume else [])
    if nproc == 1:
        return [sys.executable, "-m", "edgeprune", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--module", "edgeprune", *args]


def launch(out: Path, nproc: int, resume: bool = False) -> subprocess.Popen:
    """Start the run in the background; its output goes to a file (a full pipe would stall it)."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(compress_command(out, nproc, resume), cwd=REPO, env=free_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def run(out: Path, nproc: int, resume: bool = False, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run to the end; ``CompletedProcess`` with text output."""
    return subprocess.run(compress_command(out, nproc, resume), cwd=REPO, env=free_env(), capture_output=True,
                          text=True, timeout=timeout)


def _descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_when(proc: subprocess.Popen, path: Path, timeout: float = 90) -> None:
    """SIGKILL the launcher and all its workers as soon as ``path`` exists (a power cut, not a shutdown)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {path} appeared:\n{_output(proc)}")
        if time.monotonic() > deadline:
            _kill_tree(proc)
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    _kill_tree(proc)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it, then reap it."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    proc.log.close()  # type: ignore[attr-defined]


def free_env() -> Dict[str, str]:
    """The test environment without any torchrun variables leaking in from outside."""
    return {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                      "MASTER_PORT")}
