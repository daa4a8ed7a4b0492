"""What machine this is: the fingerprint that keys cached plans and fills bench reports."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Dict, Optional

from edge_runtime.errors import EdgeRuntimeError

THREADS_PER_CORE = 4  # more threads than this per core only adds switching: 100,000 crashed onnxruntime


def max_threads() -> int:
    """The most threads a session may ask for on this machine (at least 1)."""
    return max(1, THREADS_PER_CORE * (os.cpu_count() or 1))


def check_threads(threads: Optional[int]) -> None:
    """Refuse a thread count below 1 or above ``max_threads()`` (``--threads 100000`` made onnxruntime
    crash with SIGSEGV, 5000 hung it for over a minute); None means "all cores" and passes."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EdgeRuntimeError(f"threads must be a whole number of at least 1, got {threads!r}")
    if threads > max_threads():
        raise EdgeRuntimeError(f"threads {threads} is more than {max_threads()} ({THREADS_PER_CORE} per core "
                               f"on this {os.cpu_count() or 1}-core machine)")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``Model`` on a Raspberry Pi), else platform's guess."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields.get("model name") or fields.get("Model") or fields.get("Hardware") or platform.machine()


def fingerprint() -> Dict[str, object]:
    """Machine, CPU, cores and library versions: a plan measured here is valid where these match."""
    import numpy
    import scipy

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "onnxruntime": ort_version,
        "platform": sys.platform,
    }
