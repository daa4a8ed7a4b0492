"""Turn results.json into results.csv and report.md (and the table printed at the end of a sweep).

Everything here reads the results dict only, so a report can be rebuilt from a results.json alone —
including the partial one an interrupted sweep leaves behind.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.device_facts import DEFAULT_TEMP_LIMIT_C, decode_throttled, host_warnings, summary_rows
from benchmarks.sweep_plan import REFERENCE_KERNELS, VARIANT_KERNELS, reference_indices
from edge_runtime.safe_io import atomic_write_text

CSV_FIELDS = ["host", "model", "method", "level", "sparsity", "variant", "accuracy", "size_bytes", "kernels", "engine",
              "threads",
              "status", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms",
              "throughput_per_s", "peak_rss_mb", "load_s", "first_ms", "iterations", "speedup_vs_ort_dense",
              "reference_only", "temperature_c_before", "temperature_c_after", "throttled_after", "error"]


def host_label(data: Dict[str, object], key: str) -> str:
    """A host's display name (``user@host:port`` after ~/.ssh/config, or ``local``)."""
    return str(data["hosts"].get(key, {}).get("name") or key)


def rows(data: Dict[str, object]) -> List[Dict[str, object]]:
    """One flat row per configuration record, with the speed-up against ort on the dense model.

    The reference is the least sparse model of the same architecture under ``ort`` on the same host
    at the same thread count: a wide MLP is never compared with a small one.
    """
    models = data.get("models") or []
    by_family = reference_indices(models)
    refs = set(by_family.values())
    reference_p50: Dict[Tuple[str, int, str], float] = {}
    for record in data["results"]:
        if record["status"] == "ok" and record["model_index"] in refs and record["kernels"] == REFERENCE_KERNELS:
            family = str(models[record["model_index"]].get("family") or "")
            reference_p50[(record["host"], record["threads"], family)] = record["bench"]["latency_ms"]["p50"]
    table = []
    for record in data["results"]:
        model = models[record["model_index"]] if record["model_index"] < len(models) else {}
        bench = record.get("bench") or {}
        latency = bench.get("latency_ms") or {}
        size = model.get("size_bytes") or (bench.get("model") or {}).get("size_bytes")
        reference = reference_p50.get((record["host"], record["threads"], str(model.get("family") or "")))
        is_reference = record["model_index"] in refs and record["kernels"] == REFERENCE_KERNELS
        p50 = latency.get("p50")
        # the variant that ran (fp32 or int8): its own accuracy and file size, from the bench report
        variant = bench.get("variant") if isinstance(bench.get("variant"), dict) else {}
        if variant.get("name") not in (None, "fp32"):
            size = variant.get("size") or size
        accuracy = variant.get("accuracy") if variant.get("accuracy") is not None else model.get("accuracy")
        table.append({
            "host": host_label(data, record["host"]), "model": record["model"],
            "method": model.get("method"), "level": model.get("level"),
            "sparsity": model.get("sparsity"), "accuracy": accuracy, "size_bytes": size,
            "variant": variant.get("name"), "engine": bench.get("engine"),
            "kernels": record["kernels"], "threads": record["threads"], "status": record["status"],
            "p50_ms": p50, "p90_ms": latency.get("p90"), "p99_ms": latency.get("p99"),
            "mean_ms": latency.get("mean"), "std_ms": latency.get("std"), "min_ms": latency.get("min"),
            "max_ms": latency.get("max"), "throughput_per_s": bench.get("throughput_per_s"),
            "peak_rss_mb": bench.get("peak_rss_mb"), "load_s": bench.get("load_s"),
            "first_ms": bench.get("first_ms"), "iterations": bench.get("iterations"),
            "speedup_vs_ort_dense": reference / p50 if reference and p50 else None,
            "reference_only": record.get("reference_only", False), "is_reference": is_reference,
            "family": str(model.get("family") or ""),
            "family_label": models[by_family[str(model.get("family") or "")]]["label"] if model else "",
            "temperature_c_before": record.get("temperature_c_before"),
            "temperature_c_after": record.get("temperature_c_after"),
            "throttled_after": record.get("throttled_after"), "error": record.get("error"),
        })
    return table


def warnings(data: Dict[str, object]) -> List[str]:
    """Every host's throttling and temperature warnings."""
    limit = float((data.get("settings") or {}).get("temp_limit_c") or DEFAULT_TEMP_LIMIT_C)
    found = []
    for key, entry in data["hosts"].items():
        records = [r for r in data["results"] if r["host"] == key]
        found += host_warnings(host_label(data, key), entry, records, limit)
    return found


def write_csv(table: Sequence[Dict[str, object]], path: Path) -> None:
    """results.csv: one line per configuration, raw numbers (no units, no rounding)."""
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS})
    atomic_write_text(path, out.getvalue())


def _fmt(value: object, pattern: str = "{:.3g}") -> str:
    return "—" if value is None else pattern.format(value)


def _percent(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}%" if value > 1 else f"{100 * value:.1f}%"  # fractions and percentages alike


def _size(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value / 1024:.1f} KiB" if value < 1024 * 1024 else f"{value / 1024 / 1024:.2f} MiB"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def results_table(table: Sequence[Dict[str, object]], several_hosts: bool) -> str:
    """The main table: one line per measured configuration."""
    header = (["host"] if several_hosts else []) + [
        "model", "sparsity", "accuracy", "size", "variant", "kernels", "engine", "threads", "p50 ms", "p90 ms",
        "spread", "throughput/s", "peak RSS MB", "speed-up"]
    body = []
    for row in table:
        if row["status"] != "ok":
            continue
        body.append(([row["host"]] if several_hosts else []) + [
            row["model"] + (" (ref)" if row["reference_only"] else ""), _percent(row["sparsity"]),
            _percent(row["accuracy"]), _size(row["size_bytes"]), row["variant"] or "-", row["kernels"],
            row["engine"] or "-", row["threads"], _fmt(row["p50_ms"]), _fmt(row["p90_ms"]), _spread(row),
            _fmt(row["throughput_per_s"], "{:.0f}"), _fmt(row["peak_rss_mb"], "{:.1f}"),
            _fmt(row["speedup_vs_ort_dense"], "{:.2f}×")])
    return markdown_table(header, body) if body else "_No configuration produced figures._"


def _spread(row: Dict[str, object]) -> str:
    """p90 / p50: how noisy the configuration was (1.05× is steady; 2× means the median hides a lot)."""
    p50, p90 = row.get("p50_ms"), row.get("p90_ms")
    return f"{p90 / p50:.2f}×" if isinstance(p50, (int, float)) and isinstance(p90, (int, float)) and p50 > 0 else "-"


def fleet_table(table: Sequence[Dict[str, object]], hosts: Sequence[str]) -> str:
    """p50 latency with one column per host, for a fleet of devices side by side."""
    cells: Dict[Tuple[str, str, int], Dict[str, str]] = {}
    for row in table:
        if row["status"] == "ok":
            cells.setdefault((row["model"], row["kernels"], row["threads"]), {})[row["host"]] = _fmt(row["p50_ms"])
    body = [[m, k, t] + [per_host.get(h, "—") for h in hosts] for (m, k, t), per_host in cells.items()]
    return markdown_table(["model", "kernels", "threads"] + [f"{h} p50 ms" for h in hosts], body)


def devices_table(data: Dict[str, object]) -> str:
    """Each device's facts in its own column, with temperatures and throttling flags."""
    keys = list(data["hosts"])
    columns = []
    for key in keys:
        entry = data["hosts"][key]
        before, after = entry.get("facts_before") or {}, entry.get("facts_after") or {}
        facts = summary_rows(before)
        temps = [r.get("temperature_c_after") for r in data["results"] if r["host"] == key]
        temps = [t for t in temps + [before.get("temperature_c"), after.get("temperature_c")] if t is not None]
        facts["temperature °C (before / max / after)"] = " / ".join(
            [_fmt(before.get("temperature_c"), "{:.1f}"), _fmt(max(temps) if temps else None, "{:.1f}"),
             _fmt(after.get("temperature_c"), "{:.1f}")])
        facts["get_throttled (before → after)"] = f"{_hex(before.get('throttled'))} → {_hex(after.get('throttled'))}"
        if entry.get("error"):
            facts["error"] = str(entry["error"])
        columns.append(facts)
    names = list(dict.fromkeys(name for column in columns for name in column))
    body = [[name] + [column.get(name, "—") for column in columns] for name in names]
    return markdown_table([""] + [host_label(data, k) for k in keys], body)


def _hex(flags: Optional[int]) -> str:
    if flags is None:
        return "n/a"
    names = decode_throttled(flags)
    return f"{flags:#x}" + (f" ({', '.join(names)})" if names else "")


def failures_table(table: Sequence[Dict[str, object]]) -> str:
    """Configurations that crashed, timed out or could not run, with the reason."""
    body = [[r["host"], r["model"], r["kernels"], r["threads"], r["status"].upper(), r["error"] or ""]
            for r in table if r["status"] != "ok"]
    return markdown_table(["host", "model", "kernels", "threads", "status", "error"], body)


def _setting(settings: Dict[str, object], name: str) -> str:
    value = settings.get(name)
    return "edge-runtime's default" if value is None else str(value)


def variant_skips(data: Dict[str, object]) -> str:
    """One line naming the models a variant kernels choice (``ort-int8``) was not run on, because their
    MODEL_DIR has no such variant; "" when every model ran every asked choice."""
    models = data.get("models") or []
    lines = []
    for kernels in [k for k in (data.get("settings") or {}).get("kernels", []) if k in VARIANT_KERNELS]:
        ran = {r["model_index"] for r in data["results"] if r["kernels"] == kernels}
        missing = [str(m.get("label")) for i, m in enumerate(models) if i not in ran]
        if missing and data.get("complete"):
            lines.append(f"{kernels} not measured for {', '.join(missing)}: no {VARIANT_KERNELS[kernels]} variant "
                         f"in the MODEL_DIR (export --quantize {VARIANT_KERNELS[kernels]} adds one).")
    return " ".join(lines)


def render_markdown(data: Dict[str, object], table: Sequence[Dict[str, object]]) -> str:
    """report.md: warnings first, then devices, the results, the fleet view and the failures."""
    settings = data.get("settings") or {}
    hosts = [host_label(data, k) for k in data["hosts"]]
    models = data.get("models") or []
    ref = ", ".join(models[i]["label"] for i in sorted(reference_indices(models).values())) or "—"
    parts = [f"# edgeprune bench — {data.get('started')}", ""]
    if data.get("interrupted") or not data.get("complete"):
        parts += ["> **Partial results**: the sweep was interrupted or is still running; "
                  "these are the configurations measured so far.", ""]
    for warning in warnings(data):
        parts += [f"> **⚠ WARNING: {warning}**", ""]
    skipped = variant_skips(data)
    if skipped:
        parts += [skipped, ""]
    parts += ["## Devices", "", devices_table(data), "", "## Results", "",
              f"kernels {','.join(settings.get('kernels', []))}; threads "
              f"{','.join(map(str, settings.get('threads', [])))}; warmup {_setting(settings, 'warmup')}, "
              f"iters {_setting(settings, 'iters')}, min-seconds {_setting(settings, 'min_seconds')}, "
              f"cooldown {settings.get('cooldown_s')} s, timeout {settings.get('timeout_s')} s per configuration, "
              "each in its own process. "
              f"Speed-up: p50 of stock onnxruntime (kernels=ort) on the least sparse model of the same "
              f"architecture ({ref}) on the same host at the same thread count, divided by this row's p50. "
              "Throughput: timed runs per second of running (runs ÷ their wall time, as onnxruntime_perf_test "
              "counts it).", "",
              results_table(table, len(hosts) > 1), ""]
    if len(hosts) > 1:
        parts += ["## Side by side (p50 ms)", "", fleet_table(table, hosts), ""]
    if any(r["status"] != "ok" for r in table):
        parts += ["## Failed configurations", "", failures_table(table), ""]
    return "\n".join(parts)


def write_reports(data: Dict[str, object], out_dir: Path) -> Tuple[List[Dict[str, object]], str]:
    """Write results.csv and report.md into ``out_dir``; return the rows and the Markdown."""
    table = rows(data)
    write_csv(table, Path(out_dir) / "results.csv")
    text = render_markdown(data, table)
    atomic_write_text(Path(out_dir) / "report.md", text + "\n")
    return table, text
