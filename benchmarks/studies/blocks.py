"""Depth pruning (``--structure blocks``): LR rewinding vs fine-tuning, and what it buys in onnxruntime.

    python3 benchmarks/studies/blocks.py                          # 3 seeds, resnet20, 60% MACs removed
    python3 benchmarks/studies/blocks.py --seeds 0 --epochs 2 --json blocks.json

resnet20 (a fully convolutional net: any input size runs it) is trained on scikit-learn's digits as
3×8×8 images (the 8×8 digits repeated over three channels: 16× cheaper to train than upsampled to
32×32 on this shared 2-core machine; accuracy is a comparison between methods, not a CIFAR figure),
then pruned with ``--structure blocks --blocks-per-level 2 --target-macs T`` (MACs counted at the
model's 3×32×32), each level retrained with lr-rewind and finetune from one dense training per
seed. Every level of every run is exported to ONNX at 3×32×32 and timed at batch 1, 1 intra-op thread,
interleaved with the dense model round by round (the minimum of each model's per-round medians): the
speed-up is dense ÷ level in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from benchmarks.studies.structured import digits_as, onnx_bytes
from compressor.config import config_for
from compressor.pipeline import compress
from compressor.run.run_dir import load_level
from compressor.train.models import build_model
from edge_runtime.safe_io import atomic_write_text

METHODS = ("lr-rewind", "finetune")
TIMED_SHAPE = (3, 32, 32)


def run_seed(seed: int, epochs: int, target: float, per_level: int, out: Path) -> Dict[str, Any]:
    """One seed: dense training, then both methods' block levels; metrics plus every level's model."""
    config = config_for("resnet20", epochs=epochs, lr_drops=(epochs * 2 // 3,) if epochs > 1 else (),
                        batch_size=64, seed=seed, structure="blocks", target_macs=target,
                        blocks_per_level=per_level, methods=METHODS, rewind_epoch=0)
    torch.manual_seed(seed)
    model = build_model("resnet20")
    train, test = digits_as((3, 8, 8), config.batch_size, seed)
    metrics = compress(model, train, test, config, out=out, device="cpu", model_name="resnet20",
                       data_name="digits-3x8x8").metrics
    models = {(method, entry["level"]): load_level(out, method=method, level=entry["level"]).model
              for method in METHODS for entry in metrics["methods"][method]}
    return {"seed": seed, "metrics": metrics, "models": models}


def time_min_of_medians(models: List[bytes], rounds: int, runs: int) -> List[float]:
    """Seconds per model at batch 1, 1 thread: rounds interleaved over the models, the minimum of each
    model's per-round medians (a round another process steals the core from only loses)."""
    import onnxruntime as ort

    sessions = []
    for data in models:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.log_severity_level = 3
        sessions.append(ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]))
    feed = np.random.default_rng(0).standard_normal((1, *TIMED_SHAPE)).astype(np.float32)
    best = [float("inf")] * len(sessions)
    for round_ in range(rounds + 1):
        for index, session in enumerate(sessions):
            name, times = session.get_inputs()[0].name, []
            for _ in range(runs):
                began = time.perf_counter()
                session.run(None, {name: feed})
                times.append(time.perf_counter() - began)
            if round_:  # round 0 warms caches and allocators
                best[index] = min(best[index], statistics.median(times))
    return best


def speedups(runs: List[Dict[str, Any]], rounds: int, repeats: int) -> Dict[tuple, float]:
    """Dense ÷ level onnxruntime time at 3×32×32, 1 thread, per (seed, method, level)."""
    keys = [(run["seed"], method, level) for run in runs for (method, level) in run["models"] if level > 0]
    by_key = {(run["seed"], m, lv): model for run in runs for (m, lv), model in run["models"].items()}
    dense = runs[0]["models"][(METHODS[0], 0)]  # the architecture is what is timed: any seed's dense
    onnx = [onnx_bytes(dense, TIMED_SHAPE)] + [onnx_bytes(by_key[key], TIMED_SHAPE) for key in keys]
    times = time_min_of_medians(onnx, rounds, repeats)
    return {key: times[0] / t for key, t in zip(keys, times[1:])} | {"dense_ms": times[0] * 1e3}


def summarise(runs: List[Dict[str, Any]], speed: Dict[Any, float]) -> List[Dict[str, Any]]:
    """Per (method, level): blocks removed, MACs removed, accuracy and speed-up, mean ± std over seeds."""
    rows = []
    depth = max(len(run["metrics"]["methods"][m]) for run in runs for m in METHODS)
    for level in range(depth):
        for method in METHODS if level else METHODS[:1]:
            entries = [(run["seed"], run["metrics"]["methods"][method][level]) for run in runs
                       if len(run["metrics"]["methods"][method]) > level]
            accuracy = [100 * e["accuracy"] for _, e in entries]
            ups = [speed[(seed, method, level)] for seed, _ in entries] if level else [1.0]
            rows.append({"method": method if level else "dense", "level": level, "n": len(entries),
                         "blocks_removed": statistics.mean(len(e.get("blocks_removed") or []) for _, e in entries),
                         "macs_removed": statistics.mean(e["macs_removed"] for _, e in entries),
                         "accuracy": _mean_std(accuracy), "speedup": _mean_std(ups), "accuracy_values": accuracy,
                         "speedup_values": ups})
    return rows


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def print_table(rows: List[Dict[str, Any]], seeds: List[int], epochs: int, dense_ms: float) -> None:
    print(f"\n## resnet20, --structure blocks: test accuracy % and onnxruntime speed-up at 3×32×32, 1 thread "
          f"(mean ± std over seeds {seeds}, {epochs} epochs per training; dense {dense_ms:.3f} ms)\n")
    print("| method | level | blocks removed | MACs removed | accuracy % | speed-up | n |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['level']} | {r['blocks_removed']:.1f} | {r['macs_removed']:.1%} | "
              f"{r['accuracy']['mean']:.2f} ± {r['accuracy']['std']:.2f} | "
              f"{r['speedup']['mean']:.2f}× ± {r['speedup']['std']:.2f} | {r['n']} |")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training (default: %(default)s)")
    parser.add_argument("--target-macs", type=float, default=0.6)
    parser.add_argument("--blocks-per-level", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model per round (default: %(default)s)")
    parser.add_argument("--json", default="benchmarks/results/blocks.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # training on one core: the machine is shared
    import onnxruntime

    seeds = [int(s) for s in args.seeds.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="edgeprune-blocks-") as scratch:
        runs = [run_seed(seed, args.epochs, args.target_macs, args.blocks_per_level, Path(scratch) / f"seed-{seed}")
                for seed in seeds]
        speed = speedups(runs, args.rounds, args.runs)
    rows = summarise(runs, speed)
    print_table(rows, seeds, args.epochs, speed["dense_ms"])
    results = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "seeds": seeds,
               "epochs": args.epochs, "target_macs": args.target_macs, "blocks_per_level": args.blocks_per_level,
               "timed_shape": list(TIMED_SHAPE), "threads": 1, "dense_ms": speed["dense_ms"], "rows": rows,
               "blocks_removed": {f"{run['seed']}/{m}": run["metrics"]["methods"][m][-1].get("blocks_removed")
                                  for run in runs for m in METHODS}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
