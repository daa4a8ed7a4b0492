"""Structured pruning: does removing channels make onnxruntime faster? And LR rewinding vs fine-tuning.

    python3 benchmarks/studies/structured.py                       # latency table: resnet20 and digits-cnn
    python3 benchmarks/studies/structured.py --compare-methods     # + LRR vs FT on digits-cnn, 3 seeds
    python3 benchmarks/studies/structured.py --json out.json --rounds 9 --epochs 3
    python3 benchmarks/studies/structured.py --speedups 1.8,3 --search-widths 0.7   # + speed-up targets, width search

Latency: each model is trained briefly (``--epochs``, dense then one retraining per level) on the
scikit-learn digits — resnet20 sees them upsampled to 3×32×32 (accuracy is only a sanity figure;
latency does not depend on it) — then pruned with ``--structure channels`` to 30/50/70% of its MACs
removed with each ``--allocate`` choice (one-shot from the shared dense network, so each level
prunes the same weights; the latency-table allocations share one table measured at the start), exported
to ONNX, and timed in onnxruntime at batch 1 with 1 and 2 intra-op threads, at the model's input
size and a larger one. Every configuration times the dense model and the pruned levels in the same
process, interleaved round by round (so load on this shared machine hits them alike); the figure is
the median over all rounds of each model's per-run times.

Methods: digits-cnn pruned iteratively (20% of the remaining channels per round) to ``--target-macs``
with lr-rewind and finetune from one dense training per seed; test accuracy mean ± std per level.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from compressor.prune.examples import example_input
from compressor.config import config_for
from compressor.train.data import TensorLoader, load_data
from compressor.errors import CompressorError
from compressor.train.models import build_model, input_shape_of
from compressor.pipeline import compress
from edge_runtime.safe_io import atomic_write_text

LEVELS = (0.3, 0.5, 0.7)
SIZES = {"resnet20": ((3, 32, 32), (3, 128, 128)), "digits-cnn": ((1, 8, 8), (1, 64, 64))}


def digits_as(shape: Sequence[int], batch_size: int, seed: int) -> Tuple[TensorLoader, TensorLoader]:
    """The digits, upsampled (nearest) and repeated over channels to ``shape`` (for resnet20)."""
    train, test = load_data("digits", (1, 8, 8), batch_size, seed)

    def grow(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=tuple(shape[1:]), mode="nearest")
        return x.repeat(1, shape[0], 1, 1)

    return (TensorLoader(grow(train.inputs), train.labels, batch_size, shuffle=True, seed=seed),
            TensorLoader(grow(test.inputs), test.labels, 256))


def loaders(model_name: str, model: torch.nn.Module, batch_size: int, seed: int):
    shape = input_shape_of(model)
    if model_name == "digits-cnn":
        return load_data("digits", shape, batch_size, seed)
    return digits_as(shape, batch_size, seed)


def prune_levels(model_name: str, epochs: int, multiple: int, scratch: Path, min_channels: int | None = None,
                 allocations: Sequence[str] = ("global",), table: Path | None = None,
                 speedups: Sequence[float] = ()) -> List[Dict[str, Any]]:
    """Dense + one-shot levels at 30/50/70% MACs removed per ``--allocate`` choice, all from one dense
    training; each entry has the model and its figures. ``table``: the latency allocation's table
    (measured once, shared by every target, so the levels differ only in their targets); the latency
    allocation also prunes to each of ``speedups`` (``--target-speedup``, predicted by that table)."""
    torch.manual_seed(0)
    dense_model = build_model(model_name)
    base = dict(epochs=epochs, lr_drops=(epochs * 2 // 3,) if epochs > 1 else (), structure="channels", one_shot=True,
                channel_multiple=multiple, min_channels=min_channels, batch_size=64, seed=0)
    train, test = loaders(model_name, dense_model, 64, 0)
    levels: List[Dict[str, Any]] = []
    dense_state = None
    runs = [(a, "target_macs", t) for a in allocations for t in LEVELS]
    runs += [("latency", "target_speedup", s) for s in speedups if "latency" in allocations]
    for allocate, kind, target in runs:
        torch.manual_seed(0)
        model = build_model(model_name)
        extra = {"latency_table": str(table)} if allocate != "global" and table else {}
        config = config_for(model_name, allocate=allocate, **{kind: target}, **extra, **base)
        out = scratch / f"{model_name}-{kind}{target}-{multiple}-{min_channels}-{allocate}"
        try:
            result = compress(model, train, test, config, out=out, device="cpu",
                              model_name=model_name, data_name="digits", pretrained=dense_state)
        except CompressorError as error:  # e.g. a --target-speedup the table says is out of reach
            print(f"- {model_name} {allocate} {kind} {target}: {error}")
            continue
        dense_entry, last = result.metrics["methods"]["lr-rewind"][0], result.final()
        if dense_state is None:  # the first run trained the dense network: every target starts from it
            from compressor.run.run_dir import load_level

            dense = load_level(out, level=0)
            dense_state = {k: v.clone() for k, v in dense.model.state_dict().items()}
            levels.append({"name": "dense", "model": dense.model.eval(), **_figures(dense_entry)})
        name = f"{int(target * 100)}%" if kind == "target_macs" else f"×{target:g} predicted"
        name += f" {allocate}" if len(allocations) > 1 or kind != "target_macs" else ""
        levels.append({"name": name, "model": result.model.cpu().eval(), **_figures(last)})
    return levels


def shared_table(model_name: str, multiple: int, min_channels: int | None, scratch: Path) -> Path:
    """One latency table for every latency-allocated target of ``model_name`` (measured here, now)."""
    from compressor.latency_shapes import model_shapes
    from edge_runtime.layer_timing import measure

    path = scratch / f"{model_name}-{multiple}-{min_channels}-table.json"
    atomic_write_text(path, measure(model_shapes(model_name, multiple, min_channels, ())).to_json())
    return path


def _figures(entry: Dict[str, Any]) -> Dict[str, Any]:
    return {k: entry.get(k) for k in ("params", "macs", "macs_removed", "accuracy", "widths", "predicted_speedup")}


def onnx_bytes(model: torch.nn.Module, shape: Sequence[int]) -> bytes:
    from compressor.export.onnx_graph import torch_to_onnx

    with torch.no_grad():
        return torch_to_onnx(model, {"input": example_input(shape)})[0].SerializeToString()


def time_sessions(models: List[bytes], shape: Sequence[int], threads: int, rounds: int, runs: int) -> List[float]:
    """p50 seconds per model at batch 1: interleaved rounds, median of every timed run."""
    import onnxruntime as ort

    sessions = []
    for data in models:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        sessions.append(ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]))
    feed = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    times: List[List[float]] = [[] for _ in sessions]
    for round_ in range(rounds + 1):
        for index, session in enumerate(sessions):
            name = session.get_inputs()[0].name
            for _ in range(runs):
                began = time.perf_counter()
                session.run(None, {name: feed})
                if round_:  # round 0 warms caches and allocators
                    times[index].append(time.perf_counter() - began)
    return [statistics.median(t) for t in times]


def latency_table(model_name: str, levels: List[Dict[str, Any]], rounds: int, runs: int) -> Dict[str, Any]:
    """Print and return one model's table: figures per level, p50 ms and speed-up per configuration."""
    results: Dict[str, Any] = {"levels": [{k: v for k, v in lv.items() if k != "model"} for lv in levels],
                               "latency": {}}
    columns = []
    for shape in SIZES[model_name]:
        exported = [onnx_bytes(lv["model"], shape) for lv in levels]
        for threads in (1, 2):
            key = f"{'x'.join(map(str, shape[1:]))} {threads}t"
            p50 = time_sessions(exported, shape, threads, rounds, runs)
            results["latency"][key] = p50
            columns.append(key)
    print(f"\n## {model_name}: onnxruntime p50 ms at batch 1 (speed-up vs dense)\n")
    print("| level | params | MACs (input size) | MACs removed | accuracy | predicted | " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(columns))
    for index, level in enumerate(levels):
        cells = []
        for key in columns:
            p50 = results["latency"][key]
            cells.append(f"{1000 * p50[index]:.3f} ({p50[0] / p50[index]:.2f}×)")
        predicted = f"{level['predicted_speedup']:.2f}×" if level.get("predicted_speedup") else "-"
        print(f"| {level['name']} | {level['params']:,} | {level['macs'] / 1e6:.2f} M | {level['macs_removed']:.1%} | "
              f"{100 * level['accuracy']:.2f}% | {predicted} | " + " | ".join(cells) + " |")
    for level in levels[1:]:
        print(f"- {level['name']} widths: " + " ".join(f"{n}:{w}" for n, w in level["widths"].items()))
    return results


def _layer_macs(shape) -> int:
    """Multiply-accumulates of one layer shape (what the width search ranks by)."""
    if shape.op == "linear":
        return shape.cin * shape.cout * max(1, int(np.prod(shape.spatial)) if shape.spatial else 1)
    out = [(size + shape.padding[i] + shape.padding[i + len(shape.kernel)] - shape.dilation[i] * (k - 1) - 1)
           // shape.stride[i] + 1 for i, (size, k) in enumerate(zip(shape.spatial, shape.kernel))]
    return shape.cout * (shape.cin // shape.groups) * int(np.prod(shape.kernel)) * int(np.prod(out))


def search_widths(table_path: Path, target: float, top: int, rounds: int, runs: int) -> Dict[str, Any]:
    """resnet20: the fastest stage widths the table predicts at ``target`` to ``target + 5%`` of the MACs removed.

    Every combination of per-stage widths (the residual width and the blocks' inner width of each
    stage; multiples of 8) is scored with the latency table; the ``top`` fastest that remove
    ``target`` to ``target + 0.05`` of the Conv/Linear MACs are built (untrained: latency does not depend on the weights),
    exported and timed against the dense model in one interleaved session — the best this CPU offers
    at that MAC budget, whatever a pruning criterion would choose.
    """
    import itertools

    from compressor.prune.latency import LatencyModel
    from compressor.prune.channels import find_groups, params_and_macs, shrink
    from edge_runtime.layer_timing import read_table

    torch.manual_seed(0)
    dense = build_model("resnet20").eval()
    shape = input_shape_of(dense)
    example = example_input(shape)
    groups = find_groups(dense, example)
    latency = LatencyModel(dense, example, groups, 8)
    latency.use(read_table(table_path), str(table_path))
    stage_roots = ["conv", "blocks.3.shortcut.0", "blocks.6.shortcut.0"]
    choices = [range(8, 17, 8), range(8, 33, 8), range(8, 65, 8)]
    dense_macs = sum(_layer_macs(layer.dense) for layer in latency.layers)
    candidates = []
    for outer in itertools.product(*choices):
        for inner in itertools.product(*choices):
            widths = {root: outer[i] for i, root in enumerate(stage_roots)}
            widths.update({f"blocks.{b}.conv1": inner[b // 3] for b in range(9)})
            removed = [g.size - widths[g.root] for g in groups]
            macs = sum(_layer_macs(layer.shape(removed)) for layer in latency.layers)
            if target <= 1 - macs / dense_macs <= target + 0.05:
                candidates.append((latency.predict(widths), outer, inner, widths))
    candidates.sort(key=lambda c: c[0])
    chosen = candidates[:top]
    models, rows = [dense], []
    for predicted, outer, inner, widths in chosen:
        model = build_model("resnet20").eval()
        shrink(model, {g.root: list(range(g.size)) for g in groups},
               {g.root: list(range(widths[g.root])) for g in groups}, example)
        params, macs = params_and_macs(model, example)
        models.append(model)
        rows.append({"stage_widths": list(outer), "inner_widths": list(inner), "predicted_ms": predicted,
                     "params": params, "macs": macs})
    dense_params, dense_macs_exact = params_and_macs(dense, example)
    p50 = time_sessions([onnx_bytes(m, shape) for m in models], shape, 1, rounds, runs)
    print(f"\n## resnet20: fastest stage widths the table predicts at {target:.0%}-{target + 0.05:.0%} MACs removed "
          f"({len(candidates)} candidates; 32×32, 1 thread, untrained)\n")
    print("| stage widths | inner widths | MACs removed | predicted ms | p50 ms | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    print(f"| dense 16/32/64 | 16/32/64 | 0% | {latency.predict({g.root: g.size for g in groups}):.3f} | "
          f"{1000 * p50[0]:.3f} | 1.00× |")
    for row, t in zip(rows, p50[1:]):
        row.update(p50_ms=1000 * t, speedup=p50[0] / t, macs_removed=1 - row["macs"] / dense_macs_exact)
        print(f"| {'/'.join(map(str, row['stage_widths']))} | {'/'.join(map(str, row['inner_widths']))} | "
              f"{row['macs_removed']:.1%} | {row['predicted_ms']:.3f} | {row['p50_ms']:.3f} | {row['speedup']:.2f}× |")
    return {"target": target, "dense_ms": 1000 * p50[0], "candidates": len(candidates), "best": rows}


def compare_methods(seeds: List[int], epochs: int, target: float, scratch: Path) -> Dict[str, Any]:
    """digits-cnn, lr-rewind vs finetune under iterative channel pruning; mean ± std per level."""
    runs = []
    for seed in seeds:
        config = config_for("digits-cnn", epochs=epochs, seed=seed, structure="channels", target_macs=target,
                            methods=("lr-rewind", "finetune"))
        torch.manual_seed(seed)
        model = build_model("digits-cnn")
        train, test = load_data("digits", input_shape_of(model), config.batch_size, seed)
        runs.append(compress(model, train, test, config, out=scratch / f"methods-{seed}", device="cpu",
                             model_name="digits-cnn", data_name="digits").metrics)
    print(f"\n## digits-cnn, --structure channels to {target:.0%} MACs removed: test accuracy % "
          f"(mean ± std over seeds {seeds}, {epochs} epochs per training)\n")
    print("Each (seed, method) takes its own path (plans come from its own weights), so a level's MACs "
          "differ a little between runs: the columns give each method's mean; n = runs that have the level.\n")
    print("| level | lr-rewind MACs removed | lr-rewind | finetune MACs removed | finetune | n |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = []
    depth = max(len(run["methods"][m]) for run in runs for m in ("lr-rewind", "finetune"))
    for level in range(depth):
        row: Dict[str, Any] = {"level": level}
        cells = []
        for method in ("lr-rewind", "finetune"):
            entries = [run["methods"][method][level] for run in runs if len(run["methods"][method]) > level]
            values = [100 * e["accuracy"] for e in entries]
            row[method] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "values": values, "macs_removed": statistics.mean(e["macs_removed"] for e in entries)}
            cells += [f"{row[method]['macs_removed']:.1%}", f"{row[method]['mean']:.2f} ± {row[method]['std']:.2f}"]
        counts = {len(row[m]["values"]) for m in ("lr-rewind", "finetune")}
        rows.append(row)
        print(f"| {level} | " + " | ".join(cells) + f" | {'/'.join(map(str, sorted(counts)))} |")
    return {"seeds": seeds, "epochs": epochs, "target_macs": target, "levels": rows}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,digits-cnn")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training (default: %(default)s)")
    parser.add_argument("--channel-multiple", type=int, default=8)
    parser.add_argument("--min-channels", type=int, default=None,
                        help="narrowest width (default: the multiple); e.g. 16 and 8 keep widths 8, 16, 32, 48, ...")
    parser.add_argument("--allocate", default="global,global-table,latency",
                        help="comma separated --allocate choices, timed together (default: %(default)s)")
    parser.add_argument("--speedups", default="",
                        help="comma separated --target-speedup values the latency allocation also prunes to, e.g. 1.8,3")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model per round (default: %(default)s)")
    parser.add_argument("--compare-methods", action="store_true", help="also LRR vs FT on digits-cnn")
    parser.add_argument("--method-seeds", default="0,1,2")
    parser.add_argument("--method-epochs", type=int, default=10)
    parser.add_argument("--method-target", type=float, default=0.7)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--search-widths", type=float, default=None, metavar="TARGET",
                        help="also time resnet20's fastest stage widths (by the latency table) at TARGET to "
                             "TARGET+5%% MACs removed, e.g. 0.7")
    parser.add_argument("--search-top", type=int, default=6)
    parser.add_argument("--json", default="structured.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # training on one core: the machine is shared
    import onnxruntime

    results: Dict[str, Any] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                               "channel_multiple": args.channel_multiple,
                               "min_channels": args.min_channels, "epochs": args.epochs,
                               "allocate": args.allocate, "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgeprune-structured-") as scratch:
        if not args.skip_latency:
            for model_name in [m for m in args.models.split(",") if m]:
                allocations = [a for a in args.allocate.split(",") if a]
                table = shared_table(model_name, args.channel_multiple, args.min_channels, Path(scratch)) \
                    if set(allocations) - {"global"} else None
                levels = prune_levels(model_name, args.epochs, args.channel_multiple, Path(scratch), args.min_channels,
                                      allocations, table, [float(x) for x in args.speedups.split(",") if x])
                results["models"][model_name] = latency_table(model_name, levels, args.rounds, args.runs)
                atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
        if args.search_widths is not None:
            table = shared_table("resnet20", 8, None, Path(scratch))
            results["width_search"] = search_widths(table, args.search_widths, args.search_top, args.rounds, args.runs)
            atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
        if args.compare_methods:
            seeds = [int(s) for s in args.method_seeds.split(",") if s]
            results["methods"] = compare_methods(seeds, args.method_epochs, args.method_target, Path(scratch))
            atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
