"""A run's results for people: metrics.json, the report.md table and the sparsity/accuracy plot."""

from __future__ import annotations

import io
import json
import math
import logging
from typing import Any, Dict, List, Optional, Set, Tuple

from compressor.run_dir import CONFIG, METRICS, RunDir, read_json

REPORT = "report.md"
PLOT = "sparsity_accuracy.png"
# A layer left with less than this fraction of its weights is warned about (and marked in report.md):
# it is close to cutting the network, and global pruning gives no other sign of it.
THIN_LAYER_DENSITY = 0.02
log = logging.getLogger("compressor")


def _number(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _accuracy(entry: Dict[str, Any]) -> float:
    """A level's accuracy as a float: NaN where there is none (a regression loss; null in metrics.json)."""
    value = entry.get("accuracy")
    return float("nan") if value is None else float(value)


def _accuracy_cells(entry: Dict[str, Any], dense: float) -> str:
    """``accuracy | Δ vs dense`` cells, "–" when the run has no accuracy (a regression loss)."""
    value = _accuracy(entry)
    if math.isnan(value):
        return "– | –"
    return f"{value:.2%} | {100 * (value - dense):+.2f}"


def markdown_table(metrics: Dict[str, Any]) -> str:
    """One row per (method, level): sparsity, compression, accuracy and its change from dense."""
    lines = [
        f"# {metrics['model']} on {metrics['data']}",
        "",
        "| method | level | sparsity | compression | accuracy | Δ vs dense | loss | epochs | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if _structured(metrics):
        return _channels_table(metrics, lines[:2])
    for method, levels in metrics["methods"].items():
        dense = _accuracy(levels[0]) if levels else 0.0
        for entry in levels:
            density = 1.0 - entry["sparsity"]
            compression = f"{1.0 / density:.1f}×" if density > 0 else "∞"
            lines.append(
                f"| {method} | {entry['level']} | {entry['sparsity']:.2%} | {compression} | "
                f"{_accuracy_cells(entry, dense)} | {_number(entry['loss'], '.4f')} | "
                f"{entry['epochs']} | {_number(entry['seconds'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def layer_table(floor: Optional[float], last_layers: Dict[str, Dict[str, float]],
                sizes: Dict[str, int]) -> str:
    """Per-layer density at each method's last level, with the floor that bounded it.

    ``last_layers`` maps method → {layer: sparsity} (``final.pt``'s ``layers``), ``sizes`` layer → weights.
    """
    if not last_layers:
        return ""
    methods = list(last_layers)
    floor_text = ("pure global pruning (no per-layer floor)" if not floor else
                  f"every prunable layer keeps at least {floor:g} × the overall density of each round, and at "
                  "least one weight (`--layer-floor`)")
    lines = ["", "## Per-layer density at the last level", "",
             f"Per-layer floor: {floor_text}. ⚠ marks a layer below {THIN_LAYER_DENSITY:.0%} density.", "",
             "| layer | weights | " + " | ".join(f"{m} density" for m in methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for name in last_layers[methods[0]]:
        cells = []
        for method in methods:
            density = 1.0 - last_layers[method].get(name, 0.0)
            cells.append(f"{density:.2%}" + (" ⚠" if density < THIN_LAYER_DENSITY else ""))
        lines.append(f"| {name} | {sizes.get(name, '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def thin_layers(layers: Dict[str, float]) -> List[Tuple[str, float]]:
    """``(layer, density)`` of every layer below :data:`THIN_LAYER_DENSITY`, given layer sparsities."""
    return [(name, 1.0 - sparsity) for name, sparsity in layers.items() if 1.0 - sparsity < THIN_LAYER_DENSITY]


def warn_thin_layers(method: str, level: int, layers: Dict[str, float], warned: Set[Tuple[str, str]]) -> None:
    """One warning line per layer of ``method`` the first time it falls below a few percent density."""
    for name, density in thin_layers(layers):
        if (method, name) not in warned:
            warned.add((method, name))
            log.warning(f"warning: {method} level {level}: layer {name} keeps only {density:.2%} of its weights "
                        f"(below {THIN_LAYER_DENSITY:.0%}); raise --layer-floor to keep more")
def _structured(metrics: Dict[str, Any]) -> bool:
    levels = [e for ls in metrics["methods"].values() for e in ls]
    return bool(levels) and all("macs" in e for e in levels)


def _channels_table(metrics: Dict[str, Any], lines: List[str]) -> str:
    """--structure channels: parameters and MACs per level, then every level's layer widths."""
    lines += ["| method | level | params | params removed | MACs | MACs removed | accuracy | Δ vs dense | "
              "epochs | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    widths = ["", "## Layer widths (output channels)", ""]
    for method, levels in metrics["methods"].items():
        dense = _accuracy(levels[0]) if levels else 0.0
        for entry in levels:
            lines.append(
                f"| {method} | {entry['level']} | {entry['params']:,} | {entry['sparsity']:.2%} | "
                f"{entry['macs']:,} | {entry['macs_removed']:.2%} | {_accuracy_cells(entry, dense)} | "
                f"{entry['epochs']} | {_number(entry['seconds'], '.1f')} |")
            shown = " ".join(f"{name}:{width}" for name, width in entry["widths"].items())
            widths.append(f"- {method} level {entry['level']}: {shown}")
    return "\n".join(lines + widths) + "\n"


def plot_png(metrics: Dict[str, Any]) -> bytes:
    """Accuracy against sparsity on a log-density axis (so 90%, 99%, ... are evenly spaced)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if _structured(metrics):  # a smaller dense network: MACs are the x axis that predicts speed
        for method, levels in metrics["methods"].items():
            ax.plot([e["macs"] / 1e6 for e in levels], [100 * _accuracy(e) for e in levels], marker="o", label=method)
        ax.invert_xaxis()  # fewer MACs to the right, like higher sparsity
        ax.set_xlabel("MACs per example (millions)")
        return _finish_plot(fig, ax, metrics)
    for method, levels in metrics["methods"].items():
        density = [max(1.0 - e["sparsity"], 1e-6) for e in levels]
        ax.plot(density, [100 * _accuracy(e) for e in levels], marker="o", label=method)
    ax.set_xscale("log")
    ax.invert_xaxis()  # sparser to the right
    densities = sorted({round(max(1.0 - e["sparsity"], 1e-6), 6) for ls in metrics["methods"].values() for e in ls},
                       reverse=True)
    shown = densities[:: max(1, len(densities) // 8)]
    ax.set_xticks(shown)
    ax.set_xticklabels([f"{100 * (1 - d):.1f}%" for d in shown], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("sparsity (log density axis)")
    return _finish_plot(fig, ax, metrics)


def _finish_plot(fig: Any, ax: Any, metrics: Dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{metrics['model']} on {metrics['data']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_metrics(run: RunDir, metrics: Dict[str, Any]) -> None:
    """RUN_DIR/metrics.json (after every finished level, so a killed run still has its results)."""
    # allow_nan=False: NaN/Infinity are not JSON, and readers in other languages reject them.
    run.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", METRICS)


def _last_layers(run: RunDir, metrics: Dict[str, Any]) -> Tuple[Dict[str, Dict[str, float]], Dict[str, int]]:
    """Each method's last level's per-layer sparsities and the layers' sizes, from its final.pt."""
    from compressor import checkpoints

    layers: Dict[str, Dict[str, float]] = {}
    sizes: Dict[str, int] = {}
    for method, levels in metrics["methods"].items():
        if len(levels) < 2:
            continue
        final = checkpoints.load(run.final_path(method, int(levels[-1]["level"])))
        if "channels" in final:  # structured: its layers are widths, reported in the main table
            continue
        layers[method] = {str(k): float(v) for k, v in dict(final.get("layers", {})).items()}
        sizes.update({name: int(final["model"][name].numel()) for name in layers[method] if name in final["model"]})
    return layers, sizes


def write_report(run: RunDir, metrics: Dict[str, Any]) -> None:
    """RUN_DIR/report.md and RUN_DIR/sparsity_accuracy.png (at the end of the run)."""
    if not run.writer:
        return
    floor = read_json(run.root / CONFIG).get("layer_floor")
    layers, sizes = _last_layers(run, metrics)
    run.write_text(markdown_table(metrics) + layer_table(floor, layers, sizes), REPORT)
    from compressor.checkpoints import atomic_write_bytes

    atomic_write_bytes(plot_png(metrics), run.root / PLOT)
