"""The sweep's two figures, drawn from the report rows with matplotlib (no display needed).

- ``latency_vs_sparsity.png``: p50 latency (bar up to p90, so noise shows) against sparsity on the
  run's log-density axis, one line per kernels choice (× host × threads where a sweep has several);
  ``auto``'s points name the engine it ran; the dense model under stock onnxruntime is a dotted line.
- ``accuracy_vs_latency.png``: the trade-off. Left, accuracy against p50 latency (each model and
  variant at its fastest kernels choice, at the first thread count); right, accuracy against size.
  One series per method and variant (fp32, int8), each point labelled with its level; the dense model
  under stock onnxruntime is a hollow star behind the points, its accuracy a dashed line over the
  ``--max-drop`` band, the level ``export --max-drop`` picks ringed.

Axis rules (plain decimals, minimum spans, legends outside the axes) live in ``compressor.run.plotting``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from compressor.run import plotting
from edge_runtime.safe_io import atomic_write_bytes
from edge_runtime.wording import counted

Row = Dict[str, object]
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray")
MARKERS = ("o", "s", "^", "D", "v", "P")  # one per host
LINESTYLES = ("-", "--", ":", "-.")  # one per thread count


def _varying(rows: Sequence[Row], *keys: str) -> List[str]:
    """The keys whose value differs between rows: only those are worth a word in a legend."""
    return [k for k in keys if len({r[k] for r in rows}) > 1]


def _index(values: Sequence[object]) -> Dict[object, int]:
    """Each distinct value's place in sorted order: a stable colour, marker or line style for it."""
    return {v: i for i, v in enumerate(sorted(set(values), key=str))}


def _latency_label(row: Row, varying: Sequence[str]) -> str:
    """kernels, and the architecture, host and thread count where the sweep has several: one line
    never joins two architectures (``bench local models/a models/b``)."""
    parts = [str(row["kernels"])]
    if "family" in varying:
        parts.append(str(row["family_label"]))
    if "host" in varying:
        parts.append(str(row["host"]))
    if "threads" in varying:
        parts.append(counted(int(row['threads']), "thread"))
    return " · ".join(parts)


def plot_latency_vs_sparsity(table: Sequence[Row], path: Path) -> None:
    """p50 latency against sparsity: colour by kernels, marker by architecture (or host), line style by
    thread count."""
    plt = plotting.pyplot()
    ok = [r for r in table if r["status"] == "ok" and r["sparsity"] is not None and r["p50_ms"]]
    measured = [r for r in ok if not r["reference_only"]]
    varying = _varying(ok, "host", "threads", "family")
    series = _group(measured, lambda r: _latency_label(r, varying))
    shape = "family" if "family" in varying else "host"  # the marker tells architectures apart, else hosts
    colour, marker, style = (_index([r[k] for r in ok]) for k in ("kernels", shape, "threads"))
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    labels = []
    for slot, (label, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: (-plotting.density(r["sparsity"]), r["p50_ms"]))
        # a small sideways nudge per series, so points measured at one sparsity do not hide each other
        nudge = 1.0 + 0.012 * (slot - (len(series) - 1) / 2)
        xs, p50 = [plotting.density(r["sparsity"]) * nudge for r in points], [r["p50_ms"] for r in points]
        spread = [max((r["p90_ms"] or r["p50_ms"]) - r["p50_ms"], 0.0) for r in points]
        first = points[0]
        ax.errorbar(xs, p50, yerr=[[0.0] * len(points), spread], capsize=2, markersize=4, label=label, zorder=3,
                    color=COLOURS[colour[first["kernels"]] % len(COLOURS)],
                    marker=MARKERS[marker[first[shape]] % len(MARKERS)],
                    linestyle=LINESTYLES[style[first["threads"]] % len(LINESTYLES)])
        engines = [r["engine"] for r in points]
        labels += [(x, y, str(e), COLOURS[colour[first["kernels"]] % len(COLOURS)])
                   for i, (x, y, e) in enumerate(zip(xs, p50, engines))  # auto's engine, where it changes
                   if first["kernels"] == "auto" and e and (i == 0 or e != engines[i - 1])]
    for i, row in enumerate(r for r in ok if r["is_reference"] and _is_dense(r)):
        ax.axhline(row["p50_ms"], color="0.4", linestyle=":", linewidth=1, zorder=1,
                   label="dense model, onnxruntime (kernels=ort)" if i == 0 else None)
    if measured:
        plotting.sparsity_axis(ax, [r["sparsity"] for r in ok], _level_marks(ok))
        plotting.positive_axis(ax, "y", [r["p50_ms"] for r in ok] + [r["p90_ms"] for r in ok])
        plotting.place_labels(ax, labels)
    else:
        plotting.no_data(ax, "no figures with a known sparsity")
    ax.set_ylabel("latency (ms): p50, bar up to p90")
    plotting.title(ax, "Latency against sparsity" + (" (labels: the engine auto ran)" if labels else ""))
    ax.grid(True, alpha=0.3)
    plotting.legend_outside(ax)
    atomic_write_bytes(path, plotting.png(fig))


def _level_marks(rows: Sequence[Row]) -> List[Tuple[float, str]]:
    return [(r["sparsity"], "dense" if r["level"] == 0 else f"L{r['level']}") for r in rows if r["level"] is not None]


def _is_dense(row: Row) -> bool:
    """Whether a row's model is a dense one (level 0, or no weight pruned), not merely the least sparse."""
    return row["level"] == 0 or (row["sparsity"] is not None and float(row["sparsity"]) < 0.005)


def _accuracy(row: Row) -> float:
    value = float(row["accuracy"])
    return value if value > 1 else 100 * value  # fractions and percentages alike


def _method(row: Row) -> str:
    """A series name: the method, and the variant when it is not plain fp32."""
    return str(row["method"] or "model") + ("" if row["variant"] in (None, "fp32") else f" {row['variant']}")


def _level(row: Row) -> str:
    return "dense" if row["level"] == 0 else "" if row["level"] is None else f"L{row['level']}"


def plot_accuracy_tradeoff(table: Sequence[Row], path: Path,
                           max_drop: float = plotting.DEFAULT_MAX_DROP) -> None:
    """Accuracy against p50 latency (left) and size (right): colour by method and variant, marker by
    host; the dense model under stock onnxruntime is a hollow star behind, its accuracy over the band."""
    plt = plotting.pyplot()
    ok = [r for r in table if r["status"] == "ok" and r["accuracy"] is not None and r["p50_ms"]]
    first_threads = min((r["threads"] for r in ok), default=None)
    fastest: Dict[tuple, Row] = {}  # each model and variant at its fastest kernels choice
    for row in ok:
        key = (row["host"], row["model"], row["variant"] or "fp32")
        if row["threads"] == first_threads and not row["reference_only"]:
            if key not in fastest or row["p50_ms"] < fastest[key]["p50_ms"]:
                fastest[key] = row
    several_families = len({r["family"] for r in ok}) > 1
    name = (lambda r: f"{_method(r)} · {r['family_label']}") if several_families else _method
    colour, marker = _index([name(r) for r in ok]), _index([r["host"] for r in ok])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    # the star and band mark a dense model: an architecture whose least sparse model is itself pruned has none
    refs = [r for r in ok if r["is_reference"] and r["threads"] == first_threads and _is_dense(r)]
    _references(left, right, refs, max_drop)
    labels: Dict[Any, list] = {left: [], right: []}
    for (series, host), points in sorted(_group(fastest.values(), lambda r: (name(r), r["host"])).items()):
        style = dict(color=COLOURS[colour[series] % len(COLOURS)], marker=MARKERS[marker[host] % len(MARKERS)],
                     markersize=4, zorder=3)
        label = series + (f" · {host}" if len(marker) > 1 else "")
        points.sort(key=lambda r: r["p50_ms"])
        left.plot([r["p50_ms"] for r in points], [_accuracy(r) for r in points], label=label, **style)
        labels[left] += [(r["p50_ms"], _accuracy(r), _level(r), style["color"]) for r in points]
    for series, points in sorted(_group([r for r in ok if r["size_bytes"] and not r["is_reference"]], name).items()):
        points = sorted({r["model"]: r for r in points}.values(), key=lambda r: r["size_bytes"])
        color = COLOURS[colour[series] % len(COLOURS)]  # sizes do not depend on the host: one line
        right.plot([r["size_bytes"] / 1024 for r in points], [_accuracy(r) for r in points], color=color,
                   marker="o", markersize=4, zorder=3)
        labels[right] += [(r["size_bytes"] / 1024, _accuracy(r), _level(r), color) for r in points]
    _mark_picks(left, list(fastest.values()), refs, max_drop)
    if not ok:
        for ax in (left, right):
            plotting.no_data(ax, "no accuracy: the models' manifests hold none\n(a regression model, or "
                                 "exported without test data)")
    else:
        plotting.positive_axis(left, "x", [r["p50_ms"] for r in list(fastest.values()) + refs])
        plotting.positive_axis(right, "x", [r["size_bytes"] / 1024 for r in ok if r["size_bytes"]])
        dense = _accuracy(refs[0]) if refs and len({r["family"] for r in refs}) == 1 else None
        plotting.accuracy_axis(left, [_accuracy(r) for r in ok], dense, max_drop)
        for ax, placed in labels.items():
            plotting.place_labels(ax, placed)
    left.set_xlabel("p50 latency (ms), fastest kernels" + (f", {counted(first_threads, 'thread')}" if ok else ""))
    right.set_xlabel("size on disk (KiB)")
    left.set_ylabel("accuracy (%)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    _legend_right(right, left)
    fig.suptitle("Accuracy against latency and size (labels: level)")
    atomic_write_bytes(path, plotting.png(fig))


def max_drop_picks(points: Sequence[Row], refs: Sequence[Row], max_drop: float) -> List[Row]:
    """Per architecture with a dense model, the fp32 point ``export --max-drop`` would pick: the sparsest
    within ``max_drop`` points of the dense accuracy (its fastest kernels' row)."""
    picks = []
    for family in dict.fromkeys(r["family"] for r in refs):
        dense = _accuracy(next(r for r in refs if r["family"] == family))
        within = [r for r in points if r["family"] == family and r["variant"] in (None, "fp32")
                  and r["sparsity"] is not None and _accuracy(r) >= dense - max_drop]
        if within:
            picks.append(max(within, key=lambda r: (float(r["sparsity"]), r["level"] or 0)))
    return picks


def _mark_picks(ax: Any, points: Sequence[Row], refs: Sequence[Row], max_drop: float) -> None:
    """A ring round each architecture's ``--max-drop`` pick, so the level to export stands out."""
    for i, row in enumerate(max_drop_picks(points, refs, max_drop)):
        ax.plot([row["p50_ms"]], [_accuracy(row)], marker="o", markersize=11, markerfacecolor="none",
                markeredgecolor="black", linestyle="none", zorder=4,
                label=f"export --max-drop {max_drop:g} picks" if i == 0 else None)


def _group(rows: Sequence[Row], key) -> Dict[object, List[Row]]:
    groups: Dict[object, List[Row]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def _references(left: Any, right: Any, refs: Sequence[Row], max_drop: float) -> None:
    """Each architecture's dense model under stock onnxruntime: a hollow star drawn behind the points
    (so the dense level's own point stays visible inside it), its accuracy a line over the band."""
    style = dict(marker="*", markersize=18, markerfacecolor="none", markeredgecolor="black", color="black",
                 linestyle="none", zorder=2)
    for accuracy in sorted({_accuracy(row) for row in refs}):  # hosts share a model's accuracy: one band
        for ax in (left, right):
            plotting.dense_band(ax, accuracy, max_drop, label=accuracy == _accuracy(refs[0]) and ax is left)
    for i, row in enumerate(refs):
        left.plot([row["p50_ms"]], [_accuracy(row)], **style, label="dense model, onnxruntime" if i == 0 else None)
        right.plot([(row["size_bytes"] or 0) / 1024], [_accuracy(row)], **style)


def _legend_right(right: Any, left: Any) -> None:
    """One legend for both panels (the series are the same), right of the right panel."""
    handles, names = left.get_legend_handles_labels()
    if handles:
        right.legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                     fontsize="small", frameon=False)


def write_plots(table: Sequence[Row], out_dir: Path) -> List[Path]:
    """Draw both figures into ``out_dir``; return their paths."""
    paths = [Path(out_dir) / "latency_vs_sparsity.png", Path(out_dir) / "accuracy_vs_latency.png"]
    plot_latency_vs_sparsity(table, paths[0])
    plot_accuracy_tradeoff(table, paths[1])
    return paths
