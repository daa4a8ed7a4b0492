"""int8 after structured pruning (#18): which widths this CPU's int8 kernels run fast, and whole networks.

    python3 benchmarks/studies/int8_widths.py                          # both parts, resnet20 at 32² and 128²
    python3 benchmarks/studies/int8_widths.py --part widths --json out.json
    python3 benchmarks/studies/int8_widths.py --part networks --cases resnet20@32

(a) ``widths``: one 3×3 conv (stride 1, pad 1, cin = cout = width) at each resnet20 stage's resolution,
widths 8..64 in steps of 8, onnxruntime fp32 (``engine ort``) and static QDQ int8 (``ort-int8``: the
one-layer models ``edge_runtime.layer_timing`` times, which onnxruntime fuses to QLinearConv), all
sessions interleaved round by round in one process. Columns: ms of the calling thread's CPU time (see
``timed``; less each engine's per-call cost, as a latency table stores it), GMAC/s, int8/fp32. On x86 without VNNI onnxruntime's int8 conv is u8s8 MLAS
(AVX2: pairs of uint8×int8 products summed into int16); its kernels block output channels and the
reduction differently from the fp32 ones, so the widths they run well need not be fp32's.

(b) ``networks``: per case (model at one input size), side by side in one interleaved timing run: dense
fp32 and int8, the default plan at 70% MACs removed (``--structure channels``, global L1, default
rounding) fp32 and int8, and int8-aware plans (``--quantize int8``: int8's rounding, 16 the narrowest;
widths from the int8 table with ``--allocate latency``; residual blocks with ``--structure
channels,blocks``; timed targets, candidates timed quantized). Every int8 network is made the way
``export --quantize int8`` makes it (``compressor.export.quantize.quantize_int8``: static QDQ,
per-channel, reduce_range, symmetric weights) from the export's own ONNX graph. Speed-ups are against
dense int8 (and dense fp32). Plans come from ``ChannelLevels`` (one-shot, what ``compress`` plans) on a
resnet20 trained ``--dense-epochs`` on the digits at 32² (latency does not depend on the weights; the
criterion does, so the plan is a trained network's). The same weights serve 128² (the net ends in a
global pool), so the default plan is the same network at both sizes. ``--retrain-epochs N``: each
pruned network retrained N epochs at 32² (SGD, prune_to_device's loop) for an fp32 accuracy column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from edge_runtime import layer_timing  # noqa: E402
from edge_runtime.layer_timing import LayerShape  # noqa: E402
from edge_runtime.safe_io import atomic_write_text  # noqa: E402

WIDTHS = tuple(range(8, 65, 8))
STAGES = {32: (32, 16, 8), 128: (128, 64, 32)}  # resnet20's three stages' resolutions at each input size
ENGINES = ("ort", "ort-int8")


# --- timing ---------------------------------------------------------------------------------------------
# This machine is shared (load 5-9 on 2 cores while these figures were taken): wall-clock times of a
# 20 ms network swing by 30% between rounds. With one intra-op thread onnxruntime runs every kernel on
# the calling thread, so that thread's CPU time (time.thread_time) is the work without the time spent
# descheduled; both are kept, wall clock being what the planner's timer (layer_timing.time_networks) sees.
def timed(models: Sequence[bytes], rounds: int, runs: int) -> Dict[str, List[float]]:
    """ms per model at batch 1, 1 thread: rounds interleaved over all models, the smallest per-round
    median, of wall clock (``wall``) and of the calling thread's CPU time (``cpu``)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    sessions = [ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]) for model in models]
    rng = np.random.default_rng(0)
    feeds = [{i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
              for i in session.get_inputs()} for session in sessions]
    medians: Dict[str, List[List[float]]] = {"wall": [[] for _ in models], "cpu": [[] for _ in models]}
    for round_ in range(rounds + 1):
        for index, session in enumerate(sessions):
            wall, cpu = [], []
            for _ in range(runs if round_ else 2):  # round 0 warms up
                began, began_cpu = time.perf_counter(), time.thread_time()
                session.run(None, feeds[index])
                wall.append(time.perf_counter() - began)
                cpu.append(time.thread_time() - began_cpu)
            if round_:
                medians["wall"][index].append(statistics.median(wall))
                medians["cpu"][index].append(statistics.median(cpu))
    return {kind: [1000 * min(m) for m in values] for kind, values in medians.items()}


# --- (a) the per-width table ----------------------------------------------------------------------------
def conv3x3(width: int, size: int) -> LayerShape:
    return LayerShape("conv", width, width, (size, size), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)


def width_table(sizes: Sequence[int], widths: Sequence[int], rounds: int, runs: int) -> Dict[str, Any]:
    """ms of every (resolution, width, engine) conv, interleaved in one process, less the engine's call cost."""
    shapes = [conv3x3(w, s) for s in sizes for w in widths]
    overhead = layer_timing.OVERHEAD_SHAPE
    models = [layer_timing.layer_onnx(shape, engine) for engine in ENGINES for shape in [overhead, *shapes]]
    both = timed(models, rounds, runs)
    times = both["cpu"]
    per_engine = len(shapes) + 1
    call = {engine: times[i * per_engine] for i, engine in enumerate(ENGINES)}
    rows = []
    for index, shape in enumerate(shapes):
        at = {e: i * per_engine + 1 + index for i, e in enumerate(ENGINES)}
        ms = {e: max(layer_timing.FLOOR_MS, times[at[e]] - call[e]) for e in ENGINES}
        work = layer_timing.macs(shape)
        rows.append({"size": shape.spatial[0], "width": shape.cin, "macs": work, "fp32_ms": ms["ort"],
                     "int8_ms": ms["ort-int8"], "int8_over_fp32": ms["ort-int8"] / ms["ort"],
                     "fp32_gmacs": work / ms["ort"] / 1e6, "int8_gmacs": work / ms["ort-int8"] / 1e6,
                     "wall_ms": {e: both["wall"][at[e]] for e in ENGINES}})
    return {"call_ms": call, "rows": rows}


def print_widths(result: Dict[str, Any]) -> None:
    print(f"\n## (a) conv 3×3, cin = cout = width, batch 1, 1 thread; thread-CPU ms less the call cost "
          f"(fp32 {result['call_ms']['ort']:.4f} ms, int8 {result['call_ms']['ort-int8']:.4f} ms)\n")
    print("| resolution | width | MMACs | fp32 ms | int8 ms | int8/fp32 | fp32 GMAC/s | int8 GMAC/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['size']}² | {row['width']} | {row['macs'] / 1e6:.2f} | {row['fp32_ms']:.4f} | "
              f"{row['int8_ms']:.4f} | {row['int8_over_fp32']:.2f} | {row['fp32_gmacs']:.1f} | "
              f"{row['int8_gmacs']:.1f} |")


# --- (b) whole networks ---------------------------------------------------------------------------------
LATENCY_70 = dict(target_macs=0.7, allocate="latency", quantize="int8")
# (row name, PruneConfig overrides, engines timed); every row one-shot from the same dense weights. With
# --quantize int8 and no --channel-multiple the rounding is int8's (16, none narrower: see table (a)).
PLANS: Tuple[Tuple[str, Dict[str, Any], Tuple[str, ...]], ...] = (
    ("default 70%", dict(structure="channels", target_macs=0.7), ("fp32", "int8")),
    ("int8 --min-channels 8 --allocate latency 70%", dict(structure="channels", min_channels=8, **LATENCY_70),
     ("int8",)),
    ("int8 --allocate latency 70%", dict(structure="channels", **LATENCY_70), ("int8",)),
    ("int8 channels,blocks 70%", dict(structure="channels,blocks", target_macs=0.7, quantize="int8"), ("int8",)),
    ("int8 channels,blocks --allocate latency 70%", dict(structure="channels,blocks", **LATENCY_70), ("int8",)),
    ("int8 --min-channels 8 channels,blocks --allocate latency 70%", dict(structure="channels,blocks",
                                                                          min_channels=8, **LATENCY_70), ("int8",)),
    ("int8 blocks 70%", dict(structure="blocks", target_macs=0.7, quantize="int8"), ("int8",)),
    ("int8 --target-speedup 1.5 channels", dict(structure="channels", allocate="latency", target_speedup=1.5,
                                                quantize="int8"), ("int8",)),
    ("int8 --target-speedup 1.5 channels,blocks", dict(structure="channels,blocks", allocate="latency",
                                                       target_speedup=1.5, quantize="int8"), ("int8",)),
)


def trained_dense(model_name: str, epochs: int) -> Dict[str, Any]:
    """The dense weights every plan starts from: trained on the digits at 32² (latency does not depend on
    them; the L1 criterion does, so plans are a trained network's). Same weights at any input size."""
    import torch

    from benchmarks.studies.prune_to_device import data, make_model, retrain

    torch.set_num_threads(1)  # the machine is shared
    train, _ = data((3, 32, 32), None, None)
    model = retrain(make_model(model_name, 32), train, epochs, 0.1 if model_name == "resnet20" else 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def planned(model_name: str, size: int, state: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """One ``compress`` plan without training: ``ChannelLevels`` one-shot from ``state`` (levels until the
    last, each built from the dense weights), its model and figures; ``error`` when it is refused."""
    from benchmarks.studies.prune_to_device import make_model
    from compressor.config import PruneConfig
    from compressor.errors import CompressorError
    from compressor.prune.criteria import criterion_named
    from compressor.prune.examples import example_input
    from compressor.prune.latency import LocalLatency
    from compressor.prune.levels import ChannelLevels
    from edge_runtime.errors import EdgeRuntimeError

    template = make_model(model_name, size)
    template.load_state_dict(state)
    example = example_input((3, size, size))
    began = time.perf_counter()
    try:
        config = PruneConfig(one_shot=True, exclude=("fc",) if model_name == "resnet20" else ("classifier",),
                             **overrides)
        levels = ChannelLevels(template, None, config, criterion_named(None, "channels") if config.removes_channels
                               else None, LocalLatency(rounds=3, runs=10), example=example)
        with tempfile.TemporaryDirectory(prefix="edgeprune-int8w-") as root:
            levels.attach_rounding(Path(root), True)
            levels.attach_table(Path(root), True)
            plan = levels.dense_plan()
            for _ in range(32):
                plan, last = levels.next_plan(levels.build(plan, state, "", state_is_dense=True), plan)
                if last:
                    break
            model = levels.build(plan, state, "", state_is_dense=True).eval()
            figures = levels.describe(model, plan)
    except (CompressorError, EdgeRuntimeError) as error:
        return {"error": str(error)}
    return {"model": model, "figures": figures, "plan_seconds": time.perf_counter() - began}


def int8_of(fp32: bytes, shape: Sequence[int], scratch: Path) -> bytes:
    """``fp32`` as ``export --quantize int8`` quantizes it (static QDQ, per-channel, reduce_range,
    symmetric weights), calibrated on seeded noise (time does not depend on the ranges)."""
    import numpy as np
    import onnx

    from compressor.export.quantize import quantize_int8

    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((8, *shape)).astype(np.float32) for _ in range(4)]
    out = scratch / f"int8-{len(list(scratch.iterdir()))}.onnx"
    quantize_int8(onnx.load_from_string(fp32), out, "input", calibration)
    return out.read_bytes()


def run_case(model_name: str, size: int, state: Dict[str, Any], args) -> Dict[str, Any]:
    """Every row of one case planned, exported (fp32 and/or int8) and timed together, interleaved."""
    from benchmarks.studies.prune_to_device import make_model
    from benchmarks.studies.structured import onnx_bytes
    from compressor.prune.channels import params_and_macs, widths
    from compressor.prune.examples import example_input

    shape, example = (3, size, size), example_input((3, size, size))
    dense = make_model(model_name, size)
    dense.load_state_dict(state)
    rows: List[Dict[str, Any]] = [{"name": "dense", "model": dense.eval(), "engines": ("fp32", "int8")}]
    for name, overrides, engines in PLANS:
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        print(f"  planning {name} ...", flush=True)
        rows.append({"name": name, "engines": engines, **planned(model_name, size, state, overrides)})
    networks, labels = [], []
    with tempfile.TemporaryDirectory(prefix="edgeprune-int8w-") as scratch:
        for index, row in enumerate(rows):
            if "model" not in row:
                continue
            fp32 = onnx_bytes(row["model"], shape)
            for engine in row["engines"]:
                networks.append(fp32 if engine == "fp32" else int8_of(fp32, shape, Path(scratch)))
                labels.append((index, engine))
    before = load()
    times = timed(networks, args.rounds, args.runs)
    after = load()
    ms = {label: t for label, t in zip(labels, times["cpu"])}
    wall = {label: t for label, t in zip(labels, times["wall"])}
    dense_macs = params_and_macs(dense, example)[1]
    out = []
    for index, row in enumerate(rows):
        if "model" not in row:
            out.append({"row": row["name"], "error": row["error"]})
            continue
        params, work = params_and_macs(row["model"], example)
        figures = row.get("figures", {})
        for engine in row["engines"]:
            t = ms[(index, engine)]
            out.append({"row": row["name"], "engine": engine, "params": params, "macs": work,
                        "macs_removed": 1 - work / dense_macs, "ms": t, "wall_ms": wall[(index, engine)],
                        "wall_vs_dense_int8": wall[(0, "int8")] / wall[(index, engine)],
                        "vs_dense_int8": ms[(0, "int8")] / t,
                        "vs_dense_fp32": ms[(0, "fp32")] / t, "vs_dense_same_engine": ms[(0, engine)] / t,
                        "predicted_speedup": figures.get("predicted_speedup"),
                        "measured_speedup_while_planning": figures.get("measured_speedup"),
                        "blocks_removed": figures.get("blocks_removed", []),
                        "widths": _stage_widths(widths(row["model"]))})
    if args.retrain_epochs and size == 32:
        accuracies = retrained_accuracy(model_name, rows, args.retrain_epochs)
        for record in out:
            record["accuracy"] = accuracies.get(record["row"])
    return {"model": model_name, "size": size, "load_before": before, "load_after": after, "rows": out}


def retrained_accuracy(model_name: str, rows: List[Dict[str, Any]], epochs: int) -> Dict[str, float]:
    """Each row's network (the dense one too) retrained ``epochs`` on the digits at 32², its fp32 test accuracy."""
    from benchmarks.studies.prune_to_device import accuracy, data, retrain

    train, test = data((3, 32, 32), None, None)
    lr = 0.1 if model_name == "resnet20" else 0.05
    found = {}
    for row in rows:
        if "model" in row:
            print(f"  retraining {row['name']} ...", flush=True)
            found[row["name"]] = accuracy(retrain(row["model"], train, epochs, lr), test)
    return found


def _stage_widths(layer_widths: Dict[str, int]) -> str:
    """Each residual block's widths as ``inner/out`` (resnet: ``16/16 ... 32/64``, removed blocks absent);
    other nets: their distinct conv widths in order."""
    pairs = [f"{w}/{layer_widths[n[:-1] + '2']}" for n, w in layer_widths.items()
             if n.endswith("conv1") and n[:-1] + "2" in layer_widths]
    if pairs:
        return " ".join(pairs)
    seen: List[str] = []
    for name, width in layer_widths.items():
        if name not in ("fc", "classifier") and str(width) not in seen:
            seen.append(str(width))
    return "/".join(seen)


def print_case(case: Dict[str, Any]) -> None:
    print(f"\n## (b) {case['model']} @ {case['size']}², onnxruntime batch 1, 1 thread, p50 ms "
          f"(load {case['load_before'].split('load average:')[-1].strip()})\n")
    print("| row | engine | MACs removed | blocks removed | widths | CPU ms | vs dense int8 | vs dense same engine "
          "| wall ms (vs dense int8) | predicted (planner) | measured (planner) | accuracy |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in case["rows"]:
        if "error" in row:
            print(f"| {row['row']} | refused: {row['error'][:160]} |")
            continue
        predicted, planned = row["predicted_speedup"], row["measured_speedup_while_planning"]
        print(f"| {row['row']} | {row['engine']} | {row['macs_removed']:.1%} | {len(row['blocks_removed'])} | "
              f"{row['widths']} | {row['ms']:.3f} | {row['vs_dense_int8']:.2f}× | {row['vs_dense_same_engine']:.2f}× | "
              f"{row['wall_ms']:.3f} ({row['wall_vs_dense_int8']:.2f}×) | {'%.2f×' % predicted if predicted else '-'} | "
              f"{'%.2f×' % planned if planned else '-'} | "
              f"{'%.1f%%' % (100 * row['accuracy']) if row.get('accuracy') is not None else '-'} |")


def load() -> str:
    """This machine's load averages (shared: figures are read beside them)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("widths", "networks", "both"), default="both")
    parser.add_argument("--sizes", default="32,128", help="input sizes whose stage resolutions (a) times")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cases", default="resnet20@32,resnet20@128", help="(b): model@size, comma separated "
                        "(resnet20, mobilenetv2)")
    parser.add_argument("--dense-epochs", type=int, default=2, help="(b): the dense network's training epochs")
    parser.add_argument("--retrain-epochs", type=int, default=0, help="(b), 32² cases: retrain each network this "
                        "many epochs for an accuracy column (0: none)")
    parser.add_argument("--only", default="", help="(b): comma separated substrings: only plans whose name has one")
    parser.add_argument("--json", default="int8_widths.json")
    args = parser.parse_args(argv)
    import logging

    import onnxruntime

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer advises pre-processing on the root logger
    results: Dict[str, Any] = {"onnxruntime": onnxruntime.__version__, "device": layer_timing.device_fingerprint(),
                               "rounds": args.rounds, "runs": args.runs}
    began = time.perf_counter()
    if args.part in ("widths", "both"):
        results["load_before_widths"] = load()
        resolutions = sorted({r for s in args.sizes.split(",") for r in STAGES[int(s)]}, reverse=True)
        results["widths"] = width_table(resolutions, WIDTHS, args.rounds, args.runs)
        results["load_after_widths"] = load()
        print_widths(results["widths"])
        print(f"\nload: {results['load_after_widths']}")
        atomic_write_text(Path(args.json), json.dumps(results, indent=1) + "\n")
    if args.part in ("networks", "both"):
        results["cases"] = []
        states: Dict[str, Any] = {}
        for case in args.cases.split(","):
            model_name, size = case.split("@")
            if model_name not in states:
                print(f"\n### training dense {model_name} at 32² ({args.dense_epochs} epochs)", flush=True)
                states[model_name] = trained_dense(model_name, args.dense_epochs)
            print(f"\n### {model_name} @ {size}²", flush=True)
            results["cases"].append(run_case(model_name, int(size), states[model_name], args))
            print_case(results["cases"][-1])
            atomic_write_text(Path(args.json), json.dumps(results, indent=1) + "\n")
    print(f"\nJSON: {args.json} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
