"""The PNGs edgeprune writes: the axis rules that keep them honest, and every figure drawn for the
inputs that used to break it (no accuracy, one level, structured runs, int8 variants, many series)."""

from __future__ import annotations

import itertools
import math

import pytest

from benchmarks.plots import write_plots
from benchmarks.report import CSV_FIELDS
from compressor.run import plotting
from compressor.run.report import plot_png

PNG = b"\x89PNG\r\n\x1a\n"


def _axes():
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    return plt, fig, ax


def test_an_accuracy_axis_spans_a_few_points_inside_0_to_100():
    low, high = plotting.linear_limits([97.1, 97.2, 97.15], min_span=plotting.MIN_ACCURACY_SPAN, bounds=(0, 100))
    assert high - low >= plotting.MIN_ACCURACY_SPAN and low < 97.1 and high > 97.2
    low, high = plotting.linear_limits([99.8, 99.9], min_span=4, bounds=(0, 100))
    assert high == 100 and low == pytest.approx(96)  # slid down, not cut short
    low, high = plotting.linear_limits([20.0, 95.0], min_span=4, bounds=(0, 100))
    assert low < 20 and high > 95  # a wide range keeps its data
    assert plotting.linear_limits([None, float("nan")]) is None


def test_latency_axes_never_magnify_noise():
    noise = [0.0092, 0.00925, 0.0093]
    low, high = plotting.log_limits(noise)
    middle = math.sqrt(0.0092 * 0.0093)
    assert low <= 0.75 * middle and high >= 1.25 * middle
    assert plotting.linear_limits(noise, from_zero=True)[0] == 0
    plt, fig, ax = _axes()
    plotting.positive_axis(ax, "y", noise)  # a narrow spread: linear from zero
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 0.0093
    plotting.positive_axis(ax, "x", [0.1, 2.0, 5.0])  # 50×: logarithmic, with plain tick labels
    assert ax.get_xscale() == "log"
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(set(text) <= set("0123456789.") for text in labels), labels
    plt.close(fig)


def test_tick_labels_are_plain_decimals():
    assert [plotting.plain(v) for v in (0.0092, 0.06, 3000.0, 25.0, 0.0, 1.5e-5)] == [
        "0.0092", "0.06", "3000", "25", "0", "0.000015"]


def test_sparsity_ticks_and_level_marks_leave_room_between_labels():
    positions = [plotting.density(1 - 0.8 ** k) for k in range(40)]  # 40 levels crowd the top axis
    kept = plotting.spaced(positions, positions[0], positions[-1], gap=0.05)
    assert 5 < len(kept) < 40 and kept[0] == 0
    span = math.log(positions[0]) - math.log(positions[-1])
    for a, b in itertools.combinations(kept, 2):
        assert abs(math.log(positions[a]) - math.log(positions[b])) >= 0.05 * span


def test_the_sparsity_axis_reads_in_plain_percent_with_levels_on_top():
    plt, fig, ax = _axes()
    sparsities = [1 - 0.5 ** k for k in range(11)]  # 0% ... 99.9%: too many for their own ticks
    plotting.sparsity_axis(ax, sparsities, [(s, str(k)) for k, s in enumerate(sparsities)])
    fig.canvas.draw()
    bottom = [t.get_text() for t in ax.get_xticklabels()]
    assert "0%" in bottom and "99.9%" in bottom and all("$" not in t and "e" not in t for t in bottom), bottom
    assert ax.get_xlim()[0] > ax.get_xlim()[1]  # sparser to the right
    few = [0.0, 0.2, 0.36]  # room for each level's own sparsity
    plotting.sparsity_axis(ax, few)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0%", "20%", "36%"]
    plt.close(fig)


def test_point_labels_never_overlap_each_other():
    plt, fig, ax = _axes()
    ax.plot([1, 2, 3], [1, 2, 1], marker="o")
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 3)
    crowd = [(2.0, 2.0, f"L{i}", "k") for i in range(30)]  # thirty labels for one point: no room for all
    shown = plotting.place_labels(ax, crowd + [(1.0, 1.0, "dense", "k")])
    assert 2 <= shown < 31
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == shown
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    plt.close(fig)


def test_the_legend_sits_outside_the_axes():
    plt, fig, ax = _axes()
    for i in range(8):
        ax.plot([0, 1], [i, i + 1], label=f"series {i}")
    plotting.legend_outside(ax)
    fig.canvas.draw()
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
    plt.close(fig)


def _levels(levels, accuracy=lambda level: 0.97 - 0.002 * level, **extra):
    return [dict({"level": k, "sparsity": 1 - 0.8 ** k, "accuracy": accuracy(k), "loss": 0.1 + 0.01 * k,
                  "epochs": 3, "seconds": 1.0}, **extra) for k in range(levels)]


def _run(methods):
    return {"model": "digits-mlp", "data": "digits", "methods": methods}


@pytest.mark.parametrize("metrics", [
    _run({"lr-rewind": _levels(14)}),
    _run({"lr-rewind": _levels(1)}),  # a single level: dense only
    _run({"lr-rewind": _levels(6, accuracy=lambda k: None)}),  # a regression loss: null accuracy
    _run({"lr-rewind": _levels(4, accuracy=lambda k: None, loss=None)}),  # nothing to plot at all
    _run({m: _levels(30) for m in ("lr-rewind", "finetune", "weight-rewind", "a", "b", "c", "d", "e", "f",
                                   "g", "h", "i")}),  # more methods than colours, 30 levels each
    _run({m: [dict(e, macs=int(4e7 * 0.8 ** e["level"]), macs_removed=1 - 0.8 ** e["level"], params=1000,
                   widths={}) for e in _levels(6)] for m in ("lr-rewind", "finetune", "weight-rewind")}),
], ids=["one-method", "one-level", "no-accuracy", "no-accuracy-no-loss", "many-methods", "structured"])
def test_the_run_plot_is_drawn_for_every_kind_of_run(metrics):
    image = plot_png(metrics)
    assert image.startswith(PNG) and len(image) > 5000


def _row(**values):
    row = {name: None for name in CSV_FIELDS}
    row.update({"host": "local", "status": "ok", "threads": 1, "reference_only": False, "is_reference": False,
                "family": "mlp", "family_label": "dense", "method": "lr-rewind", "variant": "fp32"})
    row.update(values)
    return row


def _sweep(hosts=("pi4",), threads=(1,), kernels=("ort", "auto", "ort-int8"), levels=(0, 4, 8, 13)):
    table = []
    for host, t, k, level in itertools.product(hosts, threads, kernels, levels):
        int8 = k == "ort-int8"
        p50 = 2.0 / t if k == "ort" else 0.16 if int8 else 2.0 * 0.8 ** level
        table.append(_row(host=host, threads=t, kernels=k, model=f"level{level}", level=level,
                          method="dense" if level == 0 else "lr-rewind", sparsity=1 - 0.8 ** level,
                          accuracy=0.97 - (0.003 if int8 else 0), variant="int8" if int8 else "fp32",
                          engine="ort-int8" if int8 else "native" if k == "auto" and level > 4 else "ort",
                          size_bytes=int(4e6 * 0.8 ** level / (4 if int8 else 1)), p50_ms=p50, p90_ms=p50 * 1.2,
                          is_reference=k == "ort" and level == 0))
    return table


@pytest.mark.parametrize("table", [
    _sweep(),
    _sweep(hosts=("pi4", "pi5", "pi3"), threads=(1, 2, 4)),  # 27 series: colours, markers and styles repeat
    _sweep(levels=(8,)),  # one model
    [dict(r, accuracy=None) for r in _sweep()],  # no accuracy in any manifest
    [dict(r, p50_ms=0.0092 + 1e-6 * i, p90_ms=0.0093) for i, r in enumerate(_sweep())],  # noise only
    [dict(r, status="failed", p50_ms=None) for r in _sweep()],  # nothing measured
    [],
], ids=["int8-variants", "many-series", "one-model", "no-accuracy", "flat", "all-failed", "empty"])
def test_the_bench_figures_are_drawn_for_every_kind_of_sweep(table, tmp_path):
    for path in write_plots(table, tmp_path):
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000, path.name


# What the figures hold (read from the matplotlib objects, not the pixels) -------------------------------


@pytest.fixture
def drawn(monkeypatch):
    """Every figure drawn while the test runs, kept (drawn, so text positions are final) before it is saved."""
    figures = []
    real = plotting.png

    def keep(fig):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()  # where texts sit as drawn (saving redraws at another dpi)
        fig.kept_boxes = [{"title": ax.title.get_window_extent(renderer),
                           "marks": [t.get_window_extent(renderer) for top in ax.child_axes
                                     for t in [*top.get_xticklabels(), top.xaxis.label] if t.get_text()]}
                          for ax in fig.axes]
        figures.append(fig)
        return real(fig)

    monkeypatch.setattr(plotting, "png", keep)
    return figures


def _legend(ax_or_fig):
    legends = [ax_or_fig.get_legend()] if hasattr(ax_or_fig, "get_legend") else ax_or_fig.legends
    return [t.get_text() for legend in legends if legend for t in legend.get_texts()]


def _top_axis(ax):
    return next(child for child in ax.child_axes if child.get_label() == plotting.LEVEL_AXIS)


def test_the_sparsity_label_claims_only_the_steps_the_axis_reaches(drawn):
    plot_png(_run({"lr-rewind": _levels(8)}))  # stops at 79%
    plot_png(_run({"lr-rewind": _levels(32)}))  # reaches 99.9%
    short, long = (fig.axes[0].get_xlabel() for fig in drawn)
    assert "99" not in short and "90%" not in short and "log scale" in short
    assert "90%, 99%, 99.9% evenly spaced" in long


def test_a_100_percent_curve_stays_off_the_frame_without_ticks_past_100(drawn):
    plot_png(_run({"lr-rewind": _levels(6, accuracy=lambda k: 1.0 if k else 0.97)}))
    ax = drawn[0].axes[0]
    assert ax.get_ylim()[1] > 100
    shown = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels() if t.get_text()]
    assert shown and all(float(text) <= 100 for _, text in shown) and "100" in [text for _, text in shown]


def test_the_title_names_the_folder_and_clears_the_level_marks(drawn):
    metrics = dict(_run({"lr-rewind": _levels(14)}), model="/home/user/models/digits-wide-mlp")
    plot_png(metrics)
    fig = drawn[0]
    ax = fig.axes[0]
    assert ax.get_title() == "digits-wide-mlp on digits"
    assert _top_axis(ax) is not None
    title, marks = fig.kept_boxes[0]["title"], fig.kept_boxes[0]["marks"]
    assert marks and all(not title.overlaps(box) and title.y0 >= box.y1 for box in marks)
    assert plotting.short_name("/home/u/nets.py:build") == "nets.py:build"
    assert plotting.short_name("runs/a/model/") == "model" and plotting.short_name("digits") == "digits"


def test_the_run_plot_marks_the_max_drop_pick_and_the_test_sets_resolution(drawn):
    accuracies = [0.97, 0.968, 0.966, 0.964, 0.962, 0.96, 0.958, 0.956]  # within 1 point up to level 5
    levels = [dict(e, test_examples=450) for e in _levels(8, accuracy=lambda k: accuracies[k])]
    plot_png(_run({"lr-rewind": levels, "finetune": _levels(8)}))
    legend = _legend(drawn[0].axes[0])
    assert "export --max-drop 1 picks lr-rewind level 5" in legend
    assert "1 test example = 0.222 points" in legend
    plot_png(_run({"lr-rewind": _levels(4, accuracy=lambda k: None)}))  # no accuracy: nothing to pick
    assert not any("picks" in text or "test example" in text for text in _legend(drawn[1].axes[0]))


def _two_architectures():
    table = []
    for family, label, sparsity, p50 in (("[[64, 64]]", "a", 0.0, 0.05), ("[[64, 1024]]", "b", 0.9, 0.2)):
        for kernels in ("ort", "auto"):
            table.append(_row(model=label, family=family, family_label=label, kernels=kernels, level=None,
                              method=None, sparsity=sparsity, accuracy=0.97, size_bytes=20000, p50_ms=p50,
                              p90_ms=p50 * 1.1, engine="ort", is_reference=kernels == "ort"))
    return table


def test_models_of_two_architectures_are_never_one_curve(drawn, tmp_path):
    write_plots(_two_architectures(), tmp_path)
    latency, tradeoff = drawn
    ax = latency.axes[0]
    assert {"auto · a", "auto · b", "ort · a", "ort · b"} <= set(_legend(ax))
    series = [line for line in ax.lines if line.get_transform() == ax.transData]
    assert len(series) >= 4
    for line in series:  # each series holds one architecture's point only: no line from a to b
        assert len(set(line.get_xdata())) == 1
    left = tradeoff.axes[0]
    stars = [line for line in left.lines if line.get_marker() == "*"]
    assert len(stars) == 1  # a is dense; b, 90% sparse, is its architecture's least sparse, not a dense model
    assert [line.get_xdata()[0] for line in stars] == [0.05]


def test_labels_of_points_on_top_of_each_other_become_one():
    plt, fig, ax = _axes()
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 3)
    labels = [(2.0, 2.0, f"L{i}", "r") for i in (1, 2, 3, 5)] + [(2.0, 2.0, "dense", "b"), (1.0, 1.0, "L9", "r")]
    merged = plotting.merge_coincident(ax, labels)
    assert [text for _, _, text, _ in merged] == ["L1–L3, L5", "dense", "L9"]
    assert plotting.place_labels(ax, labels) == 3
    plt.close(fig)


def test_the_bench_plot_rings_the_level_max_drop_picks(drawn, tmp_path):
    table = [dict(r, accuracy=0.97 - 0.0009 * r["level"]) for r in _sweep(kernels=("ort", "auto"), levels=range(14))]
    write_plots(table, tmp_path)  # the band is 1 point: level 11 (96.01%) is the sparsest inside it
    left = drawn[1].axes[0]
    rings = [line for line in left.lines if line.get_marker() == "o" and line.get_markerfacecolor() == "none"]
    assert len(rings) == 1 and "export --max-drop 1 picks" in _legend(drawn[1].axes[1])  # one legend, right
    picked = next(r for r in table if r["level"] == 11 and r["kernels"] == "auto")
    assert rings[0].get_xdata()[0] == picked["p50_ms"]
