"""Collect the facts about a device that a benchmark figure needs beside it; print them as JSON.

This file is copied to the device and run there with the device's Python (``python3
device_facts_probe.py [--quick]``), so it uses the standard library only and never fails on a
missing source: every fact it cannot read is ``null``. The same script runs for the ``local`` target,
so a laptop and a Raspberry Pi report the same fields.

``--quick`` prints only what changes during a sweep (temperature and throttling flags), cheaply
enough to run between configurations.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

# Libraries whose versions change benchmark figures; read from package metadata, never imported
# (importing onnxruntime costs seconds on a Pi and may itself fail).
LIBRARIES = ("edgeprune", "numpy", "scipy", "onnxruntime")


def read_text(path: str) -> Optional[str]:
    """The stripped content of a small file, or None when it is absent or unreadable."""
    try:
        with open(path, "rb") as handle:
            # The device tree's strings end in NUL bytes.
            return handle.read(65536).decode("utf-8", "replace").replace("\x00", "").strip()
    except OSError:
        return None


def vcgencmd(*args: str) -> Optional[str]:
    """The answer of Raspberry Pi's ``vcgencmd`` (found on PATH), or None when there is none."""
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def throttled_flags() -> Optional[int]:
    """``vcgencmd get_throttled`` as an integer bit field (``throttled=0x50005``), or None."""
    answer = vcgencmd("get_throttled")
    if not answer or "=" not in answer:
        return None
    try:
        return int(answer.split("=", 1)[1].strip(), 0)
    except ValueError:
        return None


def temperatures_c() -> Dict[str, float]:
    """Every thermal zone's temperature in °C, by zone type; the SoC's from vcgencmd when present."""
    temps: Dict[str, float] = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        raw = read_text(os.path.join(zone, "temp"))
        kind = read_text(os.path.join(zone, "type")) or os.path.basename(zone)
        try:
            temps[f"{kind}:{os.path.basename(zone)}"] = int(raw) / 1000.0  # millidegrees
        except (TypeError, ValueError):
            continue
    answer = vcgencmd("measure_temp")  # "temp=48.3'C"
    if answer and "=" in answer:
        try:
            temps["vcgencmd"] = float(answer.split("=", 1)[1].split("'")[0])
        except ValueError:
            pass
    return temps


def max_temperature_c() -> Optional[float]:
    """The hottest sensor, which is what throttling reacts to."""
    temps = temperatures_c()
    return max(temps.values()) if temps else None


def cpuinfo_field(names: List[str]) -> Optional[str]:
    """The first ``name : value`` line of /proc/cpuinfo whose name is one of ``names``."""
    text = read_text("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names and value.strip():
            return value.strip()
    return None


def meminfo_mb() -> Dict[str, Optional[float]]:
    """MemTotal and MemAvailable from /proc/meminfo, in MiB."""
    found: Dict[str, Optional[float]] = {"total": None, "available": None}
    for line in (read_text("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        field = {"MemTotal": "total", "MemAvailable": "available"}.get(key)
        if field and value.split():
            found[field] = round(int(value.split()[0]) / 1024.0, 1)  # kB
    return found


def os_release() -> Optional[str]:
    """PRETTY_NAME from /etc/os-release (e.g. ``Debian GNU/Linux 12 (bookworm)``)."""
    for line in (read_text("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def library_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the libraries that matter, from their metadata."""
    from importlib import metadata

    versions: Dict[str, Optional[str]] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def board_model() -> Optional[str]:
    """The board: the device tree's model on a Pi (or cpuinfo's ``Model`` line where no device tree
    is mounted, e.g. in a container), DMI's product name on a PC."""
    return (read_text("/proc/device-tree/model") or cpuinfo_field(["Model"])
            or read_text("/sys/devices/virtual/dmi/id/product_name"))


# Arm's cpuinfo names no model, only a part number; these are the Raspberry Pis' cores.
ARM_PARTS = {"0xd03": "Arm Cortex-A53", "0xd08": "Arm Cortex-A72", "0xd0b": "Arm Cortex-A76"}


def cpu_model() -> Optional[str]:
    """The CPU's name: x86's ``model name``, or the Arm core from its part number."""
    named = cpuinfo_field(["model name", "Model name", "Processor", "cpu model"])
    part = cpuinfo_field(["CPU part"])
    return named or (ARM_PARTS.get(part, f"Arm part {part}") if part else None) or platform.processor() or None


def cores() -> Dict[str, Optional[int]]:
    """Logical CPUs in the machine and those this process may run on (containers, taskset)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"logical": os.cpu_count(), "usable": usable}


def quick_facts() -> Dict[str, object]:
    """What changes while a sweep runs: temperature and throttling."""
    return {"temperature_c": max_temperature_c(), "temperatures_c": temperatures_c(),
            "throttled": throttled_flags()}


def all_facts() -> Dict[str, object]:
    """Everything: board, CPU, memory, OS, Python, libraries, plus the quick facts."""
    facts: Dict[str, object] = {
        "hostname": platform.node(),
        "board": board_model(),
        "revision": cpuinfo_field(["Revision"]),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": cores(),
        "governor": read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "max_freq_mhz": _khz_to_mhz(read_text("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")),
        "memory_mb": meminfo_mb(),
        "os": os_release(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "libraries": library_versions(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    facts.update(quick_facts())
    return facts


def _khz_to_mhz(text: Optional[str]) -> Optional[float]:
    try:
        return int(text) / 1000.0 if text else None
    except ValueError:
        return None


def main(argv: List[str]) -> int:
    """Print the facts as one JSON object on stdout."""
    facts = quick_facts() if "--quick" in argv else all_facts()
    json.dump(facts, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
