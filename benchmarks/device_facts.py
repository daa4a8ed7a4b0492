"""Read the device facts collected by ``device_facts_probe.py`` and say when figures cannot be trusted.

A Raspberry Pi that throttles (too hot, or under-voltage from a weak power supply) runs slower for
reasons that have nothing to do with the model; a benchmark taken then is misleading. The report
warns loudly when ``vcgencmd get_throttled`` shows throttling during the sweep, or when the device got
hotter than a limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional

PROBE_SCRIPT = Path(__file__).with_name("device_facts_probe.py")
SUPERVISOR_SCRIPT = Path(__file__).with_name("bench_supervisor.py")
DEVICE_SCRIPTS = (PROBE_SCRIPT, SUPERVISOR_SCRIPT)  # copied to the device together

DEFAULT_TEMP_LIMIT_C = 80.0  # a Pi 4/5 starts soft throttling at 80 °C

# `vcgencmd get_throttled` bits (Raspberry Pi documentation): low bits are "now", bits 16+ "since boot".
THROTTLE_BITS = {
    0: "under-voltage now", 1: "ARM frequency capped now", 2: "throttled now",
    3: "soft temperature limit now",
    16: "under-voltage occurred", 17: "ARM frequency capping occurred", 18: "throttling occurred",
    19: "soft temperature limit occurred",
}
NOW_MASK = 0xF
SINCE_BOOT_MASK = 0xF0000


def decode_throttled(flags: Optional[int]) -> List[str]:
    """The names of the bits set in a ``get_throttled`` value (empty for 0 or None)."""
    if not flags:
        return []
    return [name for bit, name in THROTTLE_BITS.items() if flags & (1 << bit)]


def throttle_warnings(host: str, before: Optional[int], during: Iterable[Optional[int]]) -> List[str]:
    """Warnings when the device throttled during the sweep.

    ``during`` holds the flags read after each configuration and at the end. A "now" bit at any
    point, or a "since boot" bit that was not set before the sweep, means the sweep was affected. A
    "since boot" bit already set before is reported more mildly: it happened, maybe not now.
    """
    seen = [f for f in during if f is not None]
    if not seen and before is None:
        return []
    union = 0
    for flags in seen:
        union |= flags
    now_bits = (union | (before or 0)) & NOW_MASK
    new_bits = union & SINCE_BOOT_MASK & ~(before or 0)
    warnings = []
    if now_bits or new_bits:
        names = ", ".join(decode_throttled(now_bits | new_bits))
        warnings.append(f"{host} THROTTLED during the sweep ({names}; get_throttled={union:#x}): "
                        "its figures are slower than the device can do")
    elif before and before & SINCE_BOOT_MASK:
        warnings.append(f"{host} has throttled since boot, before this sweep "
                        f"({', '.join(decode_throttled(before))}): check cooling and power supply")
    return warnings


def temperature_warnings(host: str, temperatures: Iterable[Optional[float]], limit_c: float) -> List[str]:
    """A warning when any temperature read during the sweep reached ``limit_c``."""
    seen = [t for t in temperatures if t is not None]
    if seen and max(seen) >= limit_c:
        return [f"{host} reached {max(seen):.1f} °C during the sweep (limit {limit_c:g} °C): "
                "figures may be throttled; add cooling or --cooldown"]
    return []


def host_warnings(host: str, host_entry: Dict[str, object], records: List[Dict[str, object]],
                  limit_c: float) -> List[str]:
    """Every warning about one host, from its facts before/after and its per-configuration readings."""
    before = host_entry.get("facts_before") or {}
    after = host_entry.get("facts_after") or {}
    temps = [before.get("temperature_c"), after.get("temperature_c")]
    flags = [after.get("throttled")]
    for record in records:
        temps += [record.get("temperature_c_before"), record.get("temperature_c_after")]
        flags.append(record.get("throttled_after"))
    return throttle_warnings(host, before.get("throttled"), flags) + temperature_warnings(host, temps, limit_c)


def summary_rows(facts: Dict[str, object]) -> Dict[str, str]:
    """The facts a reader compares across devices, as display text, in display order."""
    def text(value: object) -> str:
        return "—" if value in (None, "", {}) else str(value)

    cores = facts.get("cores") or {}
    memory = facts.get("memory_mb") or {}
    libraries = facts.get("libraries") or {}
    rows = {
        "board": text(facts.get("board")),
        "revision": text(facts.get("revision")),
        "CPU": text(facts.get("cpu")),
        "arch": text(facts.get("machine")),
        "cores (usable/logical)": f"{text(cores.get('usable'))}/{text(cores.get('logical'))}",
        "governor": text(facts.get("governor")),
        "max freq (MHz)": text(facts.get("max_freq_mhz")),
        "memory (MiB)": text(memory.get("total")),
        "OS": text(facts.get("os")),
        "kernel": text(facts.get("kernel")),
        "Python": text(facts.get("python")),
    }
    for name, version in sorted(libraries.items()):
        rows[name] = text(version)
    return rows
