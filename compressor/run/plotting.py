"""Axis rules shared by every figure edgeprune draws (the run's plot and bench's two).

The rules a reader relies on: axes never magnify noise (a minimum span around the data), numbers are
plain decimals (no ``6×10⁻²``), tick labels never collide, sparsity reads on a log-density axis so
90%, 99%, ... are evenly spaced, a 100% curve stays off the frame, titles name folders (not absolute
paths) and keep clear of the level marks, and the dense model's accuracy with the ``--max-drop`` band behind it
says at a glance which levels are worth exporting. Everything but :func:`pyplot` is pure or draws on
an axes it is given, so the limit rules are tested as numbers, not pixels.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_MAX_DROP = 1.0  # accuracy points: the band drawn when no --max-drop is given
MIN_ACCURACY_SPAN = 4.0  # accuracy points: a y axis never spans less (0.2 points of noise look flat)
MIN_RELATIVE = 0.25  # a latency or size axis covers at least ±25% around its data
LOG_ABOVE = 8.0  # a positive axis turns logarithmic when its data spans more than this factor
SPARSITY_TICKS = (0, 50, 75, 90, 95, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.98, 99.99)
LEVEL_AXIS = "level marks"  # the top axis sparsity_axis adds: titles go above it
MIN_TICK_GAP = 0.06  # neighbouring tick labels at least this fraction of the axis apart


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: files only, never a window (works over SSH and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finite(values: Iterable[Optional[float]]) -> List[float]:
    """The values that are numbers (drops None and NaN)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def linear_limits(values: Sequence[float], min_span: float = 0.0, bounds: Tuple[float, float] = (-math.inf, math.inf),
                  from_zero: bool = False) -> Optional[Tuple[float, float]]:
    """Limits of a linear axis: the data plus 10% padding, at least ``min_span`` wide, inside ``bounds``.

    ``from_zero`` starts the axis at 0 (latency, size: the bar a ratio is read against). None for no data.
    """
    data = finite(values)
    if not data:
        return None
    lo, hi = min(data), max(data)
    if from_zero:
        return 0.0, (hi * 1.12 if hi > 0 else 1.0)
    half = max((hi - lo) / 2 * 1.2, min_span / 2, 1e-12)
    low, high = (lo + hi) / 2 - half, (lo + hi) / 2 + half
    if low < bounds[0]:  # slide the window inside the bounds rather than shrink it
        low, high = bounds[0], min(bounds[1], bounds[0] + 2 * half)
    if high > bounds[1]:
        low, high = max(bounds[0], bounds[1] - 2 * half), bounds[1]
    return low, high


def log_limits(values: Sequence[float], min_relative: float = MIN_RELATIVE) -> Optional[Tuple[float, float]]:
    """Limits of a log axis: the data with some padding, and at least ±``min_relative`` around its middle."""
    data = [v for v in finite(values) if v > 0]
    if not data:
        return None
    lo, hi = min(data), max(data)
    middle = math.sqrt(lo * hi)
    return min(lo / 1.15, middle * (1 - min_relative)), max(hi * 1.15, middle * (1 + min_relative))


def positive_axis(ax: Any, axis: str, values: Sequence[float]) -> None:
    """A latency or size axis: linear from 0, or log with plain ticks when the data spans > 8×."""
    data = [v for v in finite(values) if v > 0]
    if not data:
        return
    setter = ax.set_xlim if axis == "x" else ax.set_ylim
    if max(data) / min(data) > LOG_ABOVE:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        limits = log_limits(data)
        setter(*limits)
        plain_log_ticks(getattr(ax, f"{axis}axis"), *limits)
    else:
        setter(*linear_limits(data, from_zero=True))
        plain_ticks(getattr(ax, f"{axis}axis"))


def plain(value: float) -> str:
    """A tick label: plain decimal, three significant digits at most (0.0092, 25, 4000)."""
    if value == 0:
        return "0"
    text = np.format_float_positional(value, precision=3, unique=True, fractional=False, trim="-")
    return text.rstrip(".")


def plain_ticks(axis: Any) -> None:
    """Plain decimal labels on a linear axis (no offset, no scientific notation)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: plain(v)))


def plain_log_ticks(axis: Any, low: float, high: float) -> None:
    """Ticks at 1-2-5 (or finer for a narrow range) with plain decimal labels, no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    decades = math.log10(high / low)
    subs = (1, 1.5, 2, 3, 4, 5, 6, 8) if decades < 0.6 else (1, 2, 3, 5, 7) if decades < 1.3 else \
        (1, 2, 5) if decades < 3 else (1,)
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1) for m in subs]
    axis.set_major_locator(FixedLocator([t for t in ticks if low <= t <= high]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: plain(v)))
    axis.set_minor_locator(NullLocator())


def density(sparsity: float) -> float:
    """Where a sparsity sits on the log-density axis (kept fraction; never 0, so log works)."""
    return max(1.0 - float(sparsity), 1e-6)


def spaced(positions: Sequence[float], low: float, high: float, gap: float = MIN_TICK_GAP) -> List[int]:
    """Indices of ``positions`` (log axis, in order of preference) kept so no two are closer than
    ``gap`` of the axis ``[low, high]``: labels that would overlap are dropped, the first ones win."""
    span = abs(math.log(high) - math.log(low)) or 1.0
    kept: List[int] = []
    for i, p in enumerate(positions):
        if all(abs(math.log(p) - math.log(positions[j])) >= gap * span for j in kept):
            kept.append(i)
    return kept


def sparsity_axis(ax: Any, sparsities: Sequence[float], marks: Sequence[Tuple[float, str]] = ()) -> None:
    """The x axis as sparsity on a log-density scale (sparser to the right), with round sparsity
    ticks below and, above, each ``(sparsity, label)`` mark (the levels) where there is room."""
    densities = [density(s) for s in sparsities] or [1.0]
    high, low = max(densities) * 1.25, min(densities) / 1.25
    ax.set_xscale("log")
    ax.set_xlim(high, low)  # inverted: sparser to the right
    own = sorted({round(d, 9) for d in densities}, reverse=True)
    if len(spaced(own, low, high, gap=0.1)) == len(own):  # room for every level's own sparsity
        ticks = own
    else:
        candidates = [density(s / 100) for s in SPARSITY_TICKS if low <= density(s / 100) <= high]
        ticks = [candidates[i] for i in spaced(candidates, low, high)]
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda d, _: f"{100 * (1 - d):.4g}%"))
    ax.xaxis.set_minor_locator(NullLocator())
    # the axis is log(1 - sparsity): say so plainly, and name the equal steps only where the axis reaches them
    reaches = [s for s in (90, 99, 99.9) if density(s / 100) >= low]
    ax.set_xlabel("sparsity (log scale of the weights kept" +
                  (f": {', '.join(f'{s:g}%' for s in reaches)} evenly spaced)" if len(reaches) >= 2 else ")"))
    if marks:
        unique = {round(density(s), 6): label for s, label in marks}
        positions = sorted(unique, reverse=True)
        keep = spaced(positions, low, high, gap=0.045)
        top = ax.secondary_xaxis("top")
        top.set_label(LEVEL_AXIS)
        top.xaxis.set_major_locator(FixedLocator([positions[i] for i in keep]))
        top.xaxis.set_major_formatter(FuncFormatter(lambda d, _: unique.get(round(d, 6), "")))
        top.xaxis.set_minor_locator(NullLocator())
        top.tick_params(labelsize="small")
        top.set_xlabel("level", fontsize="small")


def accuracy_axis(ax: Any, accuracies: Sequence[float], dense: Optional[float], max_drop: float) -> None:
    """A y axis in accuracy points: at least :data:`MIN_ACCURACY_SPAN` wide, inside 0–100, showing
    the dense reference and its band."""
    shown = finite(accuracies) + ([dense, dense - max_drop] if dense is not None else [])
    limits = linear_limits(shown, min_span=MIN_ACCURACY_SPAN, bounds=(0.0, 100.0))
    if limits:
        # a curve at 100% (or 0%) must not sit on the frame: a margin beyond the bound, without ticks
        margin = 0.04 * (limits[1] - limits[0])
        ax.set_ylim(limits[0] - (margin if limits[0] <= 0 else 0), limits[1] + (margin if limits[1] >= 100 else 0))
    plain_ticks(ax.yaxis)
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: plain(v) if -1e-9 <= v <= 100 + 1e-9 else ""))


def short_name(spec: object) -> str:
    """A model or data name for a title: a path becomes its folder or file name (``runs/a/model`` →
    ``model``; ``/home/u/nets.py:build`` → ``nets.py:build``); a built-in name stays as it is."""
    text = str(spec)
    path, colon, factory = text.rpartition(":") if text.count(":") == 1 and "/" in text else (text, "", "")
    name = path.rstrip("/").rsplit("/", 1)[-1] or path
    return name + (colon + factory if colon else "")


def title(ax: Any, text: str) -> None:
    """The axes' title, raised above the level marks when a top axis holds them (else they collide)."""
    raised = any(child.get_label() == LEVEL_AXIS for child in ax.child_axes)
    ax.set_title(text, pad=40 if raised else 6)


def resolution_note(ax: Any, test_examples: Optional[int]) -> None:
    """A legend line saying how much one test example moves the accuracy (0.22 points on digits'
    450): differences below that are one example, not a trend."""
    if test_examples and test_examples > 0:
        ax.plot([], [], " ", label=f"1 test example = {plain(100 / test_examples)} points")


def dense_band(ax: Any, dense: float, max_drop: float, label: bool = True) -> None:
    """The dense model's accuracy as a dashed line over a shaded band ``max_drop`` points below it."""
    ax.axhspan(dense - max_drop, dense, color="tab:green", alpha=0.12, zorder=0, lw=0,
               label=f"within {max_drop:g} point{'s' if max_drop != 1 else ''} of dense (--max-drop {max_drop:g})"
               if label else None)
    ax.axhline(dense, color="0.35", linestyle="--", linewidth=1, zorder=1,
               label=f"dense: {dense:.2f}%" if label else None)


LABEL_OFFSETS = ((0, 6), (0, -6), (6, 0), (-6, 0), (6, 6), (-6, -6), (6, -6), (-6, 6), (0, 14), (0, -14))


def place_labels(ax: Any, labels: Sequence[Tuple[float, float, str, Any]], fontsize: float = 7) -> int:
    """Small ``(x, y, text, colour)`` labels beside their points, each at the first nearby offset
    where it covers no line, no marker and no other label; a label with no free place is left out
    (a readable subset beats a blur). Call after the axes' limits are final. Returns how many went in.
    """
    fig = ax.figure
    px = fig.dpi / 72.0  # points to pixels
    obstacles = _line_samples(ax)
    labels = merge_coincident(ax, labels)
    placed: List[Tuple[float, float, float, float]] = []
    shown = 0
    for x, y, text, color in labels:
        if not (text and math.isfinite(x) and math.isfinite(y)):
            continue
        cx, cy = ax.transData.transform((x, y))
        w, h = 0.62 * fontsize * px * len(text) + 2, fontsize * px + 2
        for dx, dy in LABEL_OFFSETS:
            left = cx + dx * px - (w / 2 if dx == 0 else 0 if dx > 0 else w)
            bottom = cy + dy * px - (h / 2 if dy == 0 else 0 if dy > 0 else h)
            box = (left, bottom, left + w, bottom + h)
            if not _covers(box, obstacles) and not any(_overlap(box, other) for other in placed):
                placed.append(box)
                ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            color=color, ha="center" if dx == 0 else "left" if dx > 0 else "right",
                            va="center" if dy == 0 else "bottom" if dy > 0 else "top")
                shown += 1
                break
    return shown


def merge_coincident(ax: Any, labels: Sequence[Tuple[float, float, str, Any]],
                     within_px: float = 4.0) -> List[Tuple[float, float, str, Any]]:
    """Labels of points drawn on top of each other (same colour, a few pixels apart) as one label
    (``L1–L5``, ``L2, L7``): five labels round one dot are a pile nobody can read."""
    groups: List[List[Tuple[float, float, str, Any]]] = []
    for label in labels:
        x, y, text, color = label
        if not (text and math.isfinite(x) and math.isfinite(y)):
            continue
        cx, cy = ax.transData.transform((x, y))
        for group in groups:
            gx, gy = ax.transData.transform(group[0][:2])
            if group[0][3] == color and math.hypot(cx - gx, cy - gy) <= within_px:
                group.append(label)
                break
        else:
            groups.append([label])
    return [(g[0][0], g[0][1], _joined([text for _, _, text, _ in g]), g[0][3]) for g in groups]


def _joined(texts: Sequence[str]) -> str:
    """``L1, L2, L3, L5`` → ``L1–L3, L5``: runs of one prefix and consecutive numbers shortened."""
    unique = list(dict.fromkeys(texts))
    if len(unique) == 1:
        return unique[0]
    parsed = []
    for text in unique:
        head = text.rstrip("0123456789")
        if head == text:  # not "prefix + number": list as they are
            return ", ".join(unique)
        parsed.append((head, int(text[len(head):])))
    parsed.sort()
    runs: List[List[Tuple[str, int]]] = []
    for head, number in parsed:
        if runs and runs[-1][-1][0] == head and runs[-1][-1][1] + 1 == number:
            runs[-1].append((head, number))
        else:
            runs.append([(head, number)])
    return ", ".join(f"{r[0][0]}{r[0][1]}" + (f"–{r[0][0]}{r[-1][1]}" if len(r) > 1 else "") for r in runs)


def _line_samples(ax: Any) -> np.ndarray:
    """Pixels along every data line and marker of ``ax`` (reference lines across the axes excluded)."""
    from matplotlib.collections import LineCollection

    paths = [np.asarray(line.get_xydata(), dtype=float) for line in ax.lines if line.get_transform() == ax.transData]
    paths += [np.asarray(segment, dtype=float) for c in ax.collections  # error bars
              if isinstance(c, LineCollection) and c.get_transform() == ax.transData for segment in c.get_segments()]
    samples = []
    for path in paths:
        xy = ax.transData.transform(path) if len(path) else np.zeros((0, 2))
        xy = xy[np.isfinite(xy).all(axis=1)]
        samples.append(xy)
        for a, b in zip(xy[:-1], xy[1:]):
            steps = int(np.hypot(*(b - a)) // 3) + 2
            samples.append(a + np.linspace(0, 1, steps)[:, None] * (b - a))
    return np.concatenate(samples) if samples else np.zeros((0, 2))


def _covers(box: Tuple[float, float, float, float], points: np.ndarray, margin: float = 3.0) -> bool:
    if not len(points):
        return False
    inside = ((points[:, 0] > box[0] - margin) & (points[:, 0] < box[2] + margin)
              & (points[:, 1] > box[1] - margin) & (points[:, 1] < box[3] + margin))
    return bool(inside.any())


def _overlap(a: Tuple[float, float, float, float], b: Tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def legend_outside(ax: Any) -> None:
    """The legend to the right of the axes, so it never covers data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  fontsize="small", frameon=False)


def no_data(ax: Any, text: str) -> None:
    """Say in an empty axes why nothing is drawn (no ticks: there is no scale to read)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.3", wrap=True)


def png(fig: Any) -> bytes:
    """The figure as PNG bytes (the bounding box grows to hold a legend outside the axes); closes it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
