"""The sweep's two figures, drawn from the report rows with matplotlib (no display needed).

- ``latency_vs_sparsity.png``: p50 latency against sparsity, one line per host × kernels × threads.
- ``accuracy_vs_latency.png``: the trade-off. Left, accuracy against p50 latency (each model at its
  fastest kernel choice, at the first thread count); right, accuracy against size on disk. One point
  per level, one series per host and method; the dense model under stock onnxruntime is the star.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence



def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window (works over SSH and in CI)
    import matplotlib.pyplot as plt

    return plt


def _percent(value: float) -> float:
    return value if value > 1 else 100 * value


def plot_latency_vs_sparsity(table: Sequence[Dict[str, object]], path: Path) -> None:
    """p50 latency (log axis) against sparsity, one line per host × kernels × threads."""
    plt = _pyplot()
    series: Dict[str, List[tuple]] = defaultdict(list)
    for row in table:
        if row["status"] == "ok" and row["sparsity"] is not None and not row["reference_only"]:
            series[f"{row['host']} · {row['kernels']} · {row['threads']}T"].append(
                (_percent(row["sparsity"]), row["p50_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Latency against sparsity")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no figures with a known sparsity", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_tradeoff(table: Sequence[Dict[str, object]], path: Path) -> None:
    """Accuracy against p50 latency and against size; the dense ort model is the reference star."""
    plt = _pyplot()
    ok = [r for r in table if r["status"] == "ok" and r["accuracy"] is not None]
    first_threads = min((r["threads"] for r in ok), default=None)
    fastest: Dict[tuple, Dict[str, object]] = {}
    for row in ok:
        if row["threads"] == first_threads and not row["reference_only"]:
            key = (row["host"], row["model"])
            if key not in fastest or row["p50_ms"] < fastest[key]["p50_ms"]:
                fastest[key] = row
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_series: Dict[str, List[Dict[str, object]]] = defaultdict(list)
    for (host, _), row in fastest.items():
        by_series[f"{host} · {row['method'] or 'model'}" + _family_suffix(row, table)].append(row)
    for label, points in sorted(by_series.items()):
        points.sort(key=lambda r: r["p50_ms"])
        left.plot([r["p50_ms"] for r in points], [_percent(r["accuracy"]) for r in points],
                  marker="o", label=label)
    sizes: Dict[str, Dict[str, Dict[str, object]]] = defaultdict(dict)
    for row in ok:
        sizes[(row["method"] or "model") + _family_suffix(row, table)][row["model"]] = row
    for method, by_model in sorted(sizes.items()):
        points = sorted(by_model.values(), key=lambda r: r["size_bytes"] or 0)
        right.plot([(r["size_bytes"] or 0) / 1024 for r in points], [_percent(r["accuracy"]) for r in points],
                   marker="o", label=method)
    for row in ok:  # the references: each architecture's densest model under stock onnxruntime
        if row["is_reference"] and row["threads"] == first_threads:
            left.plot([row["p50_ms"]], [_percent(row["accuracy"])], marker="*", markersize=16, color="black",
                      linestyle="none", label=f"{row['host']} · {row['model']} · onnxruntime")
            right.plot([(row["size_bytes"] or 0) / 1024], [_percent(row["accuracy"])], marker="*",
                       markersize=16, color="black", linestyle="none")
    left.set_xlabel(f"p50 latency (ms), fastest kernels, {first_threads} thread(s)")
    right.set_xlabel("size on disk (KiB)")
    right.set_xscale("log")
    for ax in (left, right):
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
        if ok:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no accuracy in the models' manifests", ha="center", transform=ax.transAxes)
    fig.suptitle("Accuracy against latency and size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _family_suffix(row: Dict[str, object], table: Sequence[Dict[str, object]]) -> str:
    """Tell architectures apart in a legend when a sweep holds more than one."""
    families = {r["family"] for r in table}
    return f" · {row['family_label']}" if len(families) > 1 else ""


def write_plots(table: Sequence[Dict[str, object]], out_dir: Path) -> List[Path]:
    """Draw both figures into ``out_dir``; return their paths."""
    paths = [Path(out_dir) / "latency_vs_sparsity.png", Path(out_dir) / "accuracy_vs_latency.png"]
    plot_latency_vs_sparsity(table, paths[0])
    plot_accuracy_tradeoff(table, paths[1])
    return paths
