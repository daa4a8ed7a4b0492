"""Compare the retraining methods: accuracy vs sparsity over seeds, wall time, and masking overhead.

    python3 benchmarks/studies/compress_methods.py                 # digits-mlp and digits-cnn, 30 epochs, 3 seeds
    python3 benchmarks/studies/compress_methods.py --quick         # fewer epochs (fits ~10 minutes on 2 cores)
    python3 benchmarks/studies/compress_methods.py --json out.json --models digits-mlp --epochs 20

For every model and seed one run prunes to ``--target`` (95%) with lr-rewind, finetune and
weight-rewind from one shared dense training. The table shows test accuracy mean ± std over the
seeds at every level. The overhead figure times training epochs of the same model in the same
process: without any mask, and pruned to the target (gradients, momentum and weights masked at
every step), interleaved so that machine load hits both alike.
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

import torch
from tqdm.auto import tqdm

from compressor.config import METHODS, config_for
from compressor.data import load_data
from compressor.mask import Mask
from compressor.models import build_model, input_shape_of
from compressor.optimizers import build_optimizer
from compressor.pipeline import compress
from compressor.pruning import global_magnitude_prune, prunable_parameters
from compressor.training import train_epoch
from edge_runtime.safe_io import atomic_write_text

QUICK_EPOCHS = {"digits-mlp": 10, "digits-cnn": 3}


def run_seed(model_name: str, seed: int, epochs: int, target: float, out: Path) -> Dict[str, Any]:
    """One run with every method; returns metrics.json's content plus the run's wall time."""
    config = config_for(model_name, epochs=epochs, seed=seed, target_sparsity=target, methods=METHODS)
    torch.manual_seed(seed)
    model = build_model(model_name)
    train_loader, test_loader = load_data("digits", input_shape_of(model), config.batch_size, seed)
    began = time.perf_counter()
    result = compress(model, train_loader, test_loader, config, out=out, device="cpu",
                      model_name=model_name, data_name="digits")
    return {**result.metrics, "wall_seconds": time.perf_counter() - began}


def masking_overhead(model_name: str, target: float, repeats: int) -> Dict[str, float]:
    """Median seconds per training epoch, unpruned vs pruned to ``target``, in the same process."""
    torch.manual_seed(0)
    model = build_model(model_name)
    config = config_for(model_name)
    train_loader, _ = load_data("digits", input_shape_of(model), config.batch_size, 0)
    params = prunable_parameters(model)
    full = Mask.ones_like(params)
    pruned = global_magnitude_prune(params, full, round(full.total * (1 - target)))
    optimizers = {"unpruned": build_optimizer(model, config), "pruned": build_optimizer(model, config)}
    masks = {"unpruned": Mask({}), "pruned": pruned}
    times: Dict[str, List[float]] = {"unpruned": [], "pruned": []}
    cpu = torch.device("cpu")
    for i in range(repeats + 1):
        for kind in ("unpruned", "pruned"):
            began = time.perf_counter()
            train_epoch(model, optimizers[kind], train_loader, lambda t: 0.01, 0, params, masks[kind], cpu)
            if i:  # the first round warms up allocators and caches
                times[kind].append(time.perf_counter() - began)
    unpruned, pruned_s = statistics.median(times["unpruned"]), statistics.median(times["pruned"])
    return {"unpruned_epoch_s": unpruned, "pruned_epoch_s": pruned_s, "ratio": pruned_s / unpruned,
            "repeats": repeats}


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Accuracy mean/std over seeds at each level of each method, and wall times."""
    methods = runs[0]["methods"]
    levels = []
    for index, entry in enumerate(methods[METHODS[0]]):
        row: Dict[str, Any] = {"level": entry["level"], "sparsity": entry["sparsity"], "methods": {}}
        for method in METHODS:
            values = [run["methods"][method][index]["accuracy"] for run in runs]
            row["methods"][method] = {"mean": statistics.mean(values),
                                      "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                      "values": values}
        levels.append(row)
    method_seconds = {m: statistics.mean(sum(e["seconds"] for e in run["methods"][m][1:]) for run in runs)
                      for m in METHODS}
    return {"levels": levels, "method_seconds_mean": method_seconds,
            "dense_seconds_mean": statistics.mean(run["methods"][METHODS[0]][0]["seconds"] for run in runs),
            "run_wall_seconds_mean": statistics.mean(run["wall_seconds"] for run in runs)}


def print_table(model_name: str, epochs: int, seeds: List[int], summary: Dict[str, Any],
                overhead: Dict[str, float]) -> None:
    print(f"\n## {model_name}: {epochs} epochs per training, seeds {seeds}; test accuracy % (mean ± std)\n")
    print("| level | sparsity | " + " | ".join(METHODS) + " |")
    print("|---:|---:|" + "---:|" * len(METHODS))
    for row in summary["levels"]:
        cells = [f"{100 * row['methods'][m]['mean']:.2f} ± {100 * row['methods'][m]['std']:.2f}" for m in METHODS]
        print(f"| {row['level']} | {100 * row['sparsity']:.1f}% | " + " | ".join(cells) + " |")
    seconds = ", ".join(f"{m} {s:.1f} s" for m, s in summary["method_seconds_mean"].items())
    print(f"\nwall time per seed: dense {summary['dense_seconds_mean']:.1f} s; retraining {seconds}; "
          f"whole run {summary['run_wall_seconds_mean']:.1f} s")
    print(f"epoch time: unpruned {1000 * overhead['unpruned_epoch_s']:.1f} ms, pruned "
          f"{1000 * overhead['pruned_epoch_s']:.1f} ms (masked training costs ×{overhead['ratio']:.2f})")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits-mlp,digits-cnn", help="comma separated (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="comma separated (default: %(default)s)")
    parser.add_argument("--epochs", type=int, help="epochs per training (default: the model's preset, 30)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer epochs per model: {QUICK_EPOCHS} (unless --epochs is given)")
    parser.add_argument("--target", type=float, default=0.95, help="target sparsity (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="epochs timed per overhead case (default: 5)")
    parser.add_argument("--json", default="compress_methods.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results: Dict[str, Any] = {"target_sparsity": args.target, "seeds": seeds, "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as scratch:
        for model_name in models:
            epochs = args.epochs or (QUICK_EPOCHS.get(model_name, 10) if args.quick else config_for(model_name).epochs)
            runs = [run_seed(model_name, seed, epochs, args.target, Path(scratch) / f"{model_name}-{seed}")
                    for seed in tqdm(seeds, desc=model_name, file=sys.stderr)]
            summary = summarise(runs)
            overhead = masking_overhead(model_name, args.target, args.repeats)
            results["models"][model_name] = {"epochs": epochs, **summary, "overhead": overhead}
            print_table(model_name, epochs, seeds, summary, overhead)
            atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")  # after each model: partial results survive
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
