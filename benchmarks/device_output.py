"""What a device sends back, checked before any figure of it is used.

A device (or whatever answers as one) prints JSON three times in a sweep: the facts probe, the
supervisor's envelope around each configuration, and ``edge-runtime bench --json`` inside it. All
three are untrusted. A string where a number belongs, a list where an object belongs, or NaN (which
Python's json reads and writes although JSON has no such number) must make one configuration a failed
row with a one-line reason, never a traceback in the report; and results.json stays strict JSON.
So every reader here refuses non-finite numbers, and every number the report formats is checked for
its type and range where it comes in.
"""

from __future__ import annotations

import json
import math
from typing import Dict, Optional, Tuple

# The figures of `edge-runtime bench --json` that the report, CSV and plots format as numbers.
_REPORT_NUMBERS = ("throughput_per_s", "peak_rss_mb", "load_s", "first_ms")
_ENVELOPE_NUMBERS = ("wall_s", "temperature_c_before", "temperature_c_after")


def strict_json(text: str) -> object:
    """``json.loads`` that refuses NaN, Infinity and numbers too large for a float (ValueError)."""
    def constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    def decimal(digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            raise ValueError(f"{digits[:20]} is too large a number")
        return value

    return json.loads(text, parse_constant=constant, parse_float=decimal)


def _short(value: object) -> str:
    """``repr`` of a value, cut to fit in a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: object) -> bool:
    """A JSON number (not a bool) that a float can hold."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float's range
        return False


def _number_problem(name: str, value: object, optional: bool = True) -> Optional[str]:
    """Why ``value`` is not a non-negative number (None if it is, or is None and may be)."""
    if value is None and optional:
        return None
    if not _is_number(value):
        return f"{name} is {_short(value)}, not a number"
    if value < 0:
        return f"{name} is {value}, below zero"
    return None


def bench_report_problem(report: object) -> Optional[str]:
    """Why an ``edge-runtime bench --json`` report cannot be used (None when it can).

    Checks what the report, CSV and plots read: every latency figure (p50 required), throughput, peak
    RSS, load and first-run times, iterations, the engine's name, and the variant's and model's size
    and accuracy.
    """
    if not isinstance(report, dict):
        return f"the result is {type(report).__name__}, not an object"
    latency = report.get("latency_ms")
    if not isinstance(latency, dict):
        return f"latency_ms is {_short(latency)}, not an object"
    problems = [_number_problem("latency_ms.p50", latency.get("p50"), optional=False)]
    problems += [_number_problem(f"latency_ms.{key}", value) for key, value in latency.items()]
    problems += [_number_problem(name, report.get(name)) for name in _REPORT_NUMBERS]
    iterations = report.get("iterations")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0):
        problems.append(f"iterations is {_short(iterations)}, not a count")
    if report.get("engine") is not None and not isinstance(report.get("engine"), str):
        problems.append(f"engine is {_short(report.get('engine'))}, not a name")
    problems += _part_problems(report, "variant", {"size": True, "accuracy": True}, ("name",))
    problems += _part_problems(report, "model", {"size_bytes": True, "sparsity": True}, ())
    return next((p for p in problems if p), None)


def _part_problems(report: Dict[str, object], part: str, numbers: Dict[str, bool], names: Tuple[str, ...]) -> list:
    """Problems of an optional sub-object of the report (``variant``, ``model``)."""
    value = report.get(part)
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{part} is {_short(value)}, not an object"]
    problems = [_number_problem(f"{part}.{key}", value.get(key)) for key in numbers]
    problems += [f"{part}.{key} is {_short(value.get(key))}, not a name" for key in names
                 if value.get(key) is not None and not isinstance(value.get(key), str)]
    return problems


def read_bench_report(stdout: str) -> Tuple[Optional[Dict[str, object]], Optional[str]]:
    """The report ``edge-runtime bench --json`` printed, or None and why not (one line)."""
    try:
        report = strict_json(stdout)
    except ValueError as error:
        if stdout.strip()[:1] in ("{", "["):
            return None, f"edge-runtime bench printed bad JSON ({str(error).splitlines()[0][:120]})"
        return None, "edge-runtime bench printed no JSON result: " + stdout.strip()[:200]
    problem = bench_report_problem(report)
    if problem is not None:
        return None, f"edge-runtime bench sent a bad result: {problem}"
    return report, None


def envelope_problem(envelope: Dict[str, object]) -> Optional[str]:
    """Why a supervisor envelope cannot be read at all (its exit code, timeout flag or output)."""
    code = envelope.get("returncode")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
        return f"returncode is {_short(code)}, not an exit code"
    if not isinstance(envelope.get("timed_out", False), bool):
        return f"timed_out is {_short(envelope.get('timed_out'))}, not true or false"
    for name in ("stdout", "stderr"):
        if not isinstance(envelope.get(name, ""), str):
            return f"{name} is {_short(envelope.get(name))}, not text"
    return None


def clean_envelope(envelope: Dict[str, object]) -> Dict[str, object]:
    """The envelope with its side readings (wall time, temperatures, throttling flags) made safe:
    a reading of the wrong type is dropped (None), as a device without a sensor reports it."""
    cleaned = dict(envelope)
    for name in _ENVELOPE_NUMBERS:
        if cleaned.get(name) is not None and not _is_number(cleaned[name]):
            cleaned[name] = None
    cleaned["throttled_after"] = _flags(cleaned.get("throttled_after"))
    return cleaned


def clean_facts(facts: Dict[str, object]) -> Dict[str, object]:
    """Device facts with the fields the report computes on made safe (wrong types dropped)."""
    cleaned = dict(facts)
    for name in ("cores", "memory_mb", "libraries"):
        if name in cleaned and not isinstance(cleaned[name], dict):
            cleaned[name] = None
    if cleaned.get("temperature_c") is not None and not _is_number(cleaned["temperature_c"]):
        cleaned["temperature_c"] = None
    if "throttled" in cleaned:
        cleaned["throttled"] = _flags(cleaned["throttled"])
    return cleaned


def _flags(value: object) -> Optional[int]:
    """``vcgencmd get_throttled`` bits: a non-negative int that fits 64 bits, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        return None
    return value
