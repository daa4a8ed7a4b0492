"""What machine this is: the fingerprint that keys cached plans and fills bench reports."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Dict


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
