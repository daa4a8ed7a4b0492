"""A run's results for people: metrics.json, the report.md table and the sparsity/accuracy plot."""

from __future__ import annotations

import json
import math
import logging
from typing import Any, Dict, List, Optional, Set, Tuple

from compressor.run import plotting
from compressor.run.run_dir import CONFIG, METRICS, RunDir, read_json

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
    """One row per (method, level): sparsity of the prunable weights (what --target-sparsity counts) and
    the compression it gives them, the zeros among all parameters, accuracy and its change from dense."""
    lines = [
        f"# {metrics['model']} on {metrics['data']}",
        "",
        "| method | level | sparsity (prunable weights) | compression | sparsity (all parameters) | accuracy | "
        "Δ vs dense | loss | epochs | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
                f"{_number(entry.get('sparsity_all'), '.2%')} | {_accuracy_cells(entry, dense)} | {_number(entry['loss'], '.4f')} | "
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
            if entry.get("blocks_removed"):  # --structure blocks: the residual blocks gone, not just narrower
                shown += f" (blocks removed: {', '.join(entry['blocks_removed'])})"
            widths.append(f"- {method} level {entry['level']}: {shown}")
    return "\n".join(lines + widths) + "\n"


def plot_png(metrics: Dict[str, Any], max_drop: float = plotting.DEFAULT_MAX_DROP) -> bytes:
    """Accuracy per level against sparsity (log-density axis, levels marked on top) or, for a
    ``--structure channels`` run, against MACs; the dense accuracy and the ``max_drop`` band behind.

    A run without accuracy (a regression loss) shows its test loss instead, and says so.
    """
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    methods = {m: levels for m, levels in metrics["methods"].items() if levels}
    entries = [e for levels in methods.values() for e in levels]
    scored = any(not math.isnan(_accuracy(e)) for e in entries)
    structured = _structured(metrics)
    labels = []
    for method, levels in methods.items():
        xs = [e["macs"] / 1e6 if structured else plotting.density(e["sparsity"]) for e in levels]
        ys = [_y_value(e, scored) for e in levels]
        line, = ax.plot(xs, ys, marker="o", markersize=4, label=method, zorder=3)
        # the MACs axis does not say which level a point is (the sparsity axis has the levels on top)
        labels += [(x, y, f"L{e['level']}", line.get_color()) for x, y, e in zip(xs, ys, levels)
                   if structured and (not labels or e["level"] != 0)]  # the shared dense point once
    if structured:
        _macs_axis(ax, [e["macs"] / 1e6 for e in entries])
    else:
        plotting.sparsity_axis(ax, [e["sparsity"] for e in entries],
                               [(e["sparsity"], str(e["level"])) for e in entries])
    _y_axis(ax, entries, scored, max_drop)
    if scored:
        _mark_pick(ax, methods, structured, max_drop)
        plotting.resolution_note(ax, next((e.get("test_examples") for e in entries if e.get("test_examples")), None))
    plotting.place_labels(ax, labels)
    plotting.title(ax, f"{plotting.short_name(metrics['model'])} on {plotting.short_name(metrics['data'])}")
    ax.grid(True, alpha=0.3)
    plotting.legend_outside(ax)
    return plotting.png(fig)


def max_drop_pick(levels: List[Dict[str, Any]], max_drop: float) -> Optional[Dict[str, Any]]:
    """The level ``edgeprune export --max-drop`` picks among one method's levels (export's rule: the
    sparsest within ``max_drop`` points of the dense level); None without a dense accuracy."""
    dense = next((e for e in levels if e["level"] == 0), None)
    if dense is None or math.isnan(_accuracy(dense)):
        return None
    within = [e for e in levels if _accuracy(e) >= _accuracy(dense) - max_drop / 100.0]
    return max(within, key=lambda e: (e["sparsity"], e["level"]))


def _mark_pick(ax: Any, methods: Dict[str, List[Dict[str, Any]]], structured: bool, max_drop: float) -> None:
    """A ring around the level export picks by default with ``--max-drop`` (the first method's)."""
    method, levels = next(iter(methods.items()))
    picked = max_drop_pick(levels, max_drop)
    if picked is None:
        return
    x = picked["macs"] / 1e6 if structured else plotting.density(picked["sparsity"])
    ax.plot([x], [_y_value(picked, True)], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="black",
            linestyle="none", zorder=4,
            label=f"export --max-drop {max_drop:g} picks {method} level {picked['level']}")


def _y_value(entry: Dict[str, Any], scored: bool) -> float:
    if scored:
        return 100 * _accuracy(entry)
    return float("nan") if entry.get("loss") is None else float(entry["loss"])


def _macs_axis(ax: Any, macs: List[float]) -> None:
    """MACs from 0 to the dense model's, fewer to the right like higher sparsity."""
    limits = plotting.linear_limits(macs, from_zero=True)
    if limits:
        ax.set_xlim(limits[1], limits[0])
    plotting.plain_ticks(ax.xaxis)
    ax.set_xlabel("MACs per example (millions; fewer to the right)")


def _y_axis(ax: Any, entries: List[Dict[str, Any]], scored: bool, max_drop: float) -> None:
    """Accuracy with the dense line and band, or the test loss when the run has no accuracy."""
    dense = next((e for e in entries if e["level"] == 0), None)
    if scored:
        dense_accuracy = 100 * _accuracy(dense) if dense is not None else float("nan")
        if math.isfinite(dense_accuracy):
            plotting.dense_band(ax, dense_accuracy, max_drop)
        plotting.accuracy_axis(ax, [100 * _accuracy(e) for e in entries],
                               dense_accuracy if math.isfinite(dense_accuracy) else None, max_drop)
        ax.set_ylabel("test accuracy (%)")
        return
    losses = plotting.finite(e.get("loss") for e in entries)
    if not losses:
        plotting.no_data(ax, "no accuracy and no loss recorded")
        return
    if dense is not None and dense.get("loss") is not None:
        ax.axhline(float(dense["loss"]), color="0.35", linestyle="--", linewidth=1, zorder=1,
                   label=f"dense loss: {plotting.plain(float(dense['loss']))}")
    plotting.positive_axis(ax, "y", losses)
    ax.set_ylabel("test loss (lower is better)")
    ax.text(0.01, 0.02, "no accuracy: this run's loss reports none", transform=ax.transAxes, fontsize=8,
            color="0.3")


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
