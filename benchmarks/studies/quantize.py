"""Pruning, int8 quantization, and edgeprune's ``auto`` choosing between them, side by side.

    python3 benchmarks/studies/quantize.py [--quick] [--models digits-wide-mlp mlp3072 resnet20] [--threads 1 2]
        [--out quantize_bench.json]

Rows: each model at 0/90/95/98% sparsity, batch 1, 1 and 2 threads. Columns, measured in the same run:
onnxruntime fp32 on the dense model (``--kernels ort``), onnxruntime int8 of the dense model (``--kernels
ort-int8``; dynamic for MLPs, static QDQ per-channel for resnet20) and ``edge-runtime --kernels auto`` on
the pruned model exported with ``--quantize int8`` (auto measures native sparse fp32, onnxruntime fp32
and onnxruntime int8 and keeps the fastest). Each configuration runs in its own process, the
configurations take turns for a few rounds, each keeps its best round (peak RSS: the largest).

digits-wide-mlp comes from real ``compress`` runs on the digits (dense training, then one prune +
retrain to each sparsity), so its accuracy columns mean something; mlp3072 (64→3072→3072→10) and
resnet20 have random weights pruned by magnitude per layer without retraining (latency rows only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from benchmarks.studies.runtime import bench, prune_layerwise  # noqa: E402  (after the path fix for script use)

SPARSITIES = (0.0, 0.9, 0.95, 0.98)
BASELINES = ("ort", "ort-int8")   # on the dense model
MODELS = ("digits-wide-mlp", "mlp3072", "resnet20")


def mlp3072() -> Any:
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 3072), nn.ReLU(), nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 10))
    model.input_shape = (64,)
    return model


def export_random(name: str, sparsity: float, out: Path) -> Path:
    """A random-weight model pruned by magnitude (per layer), exported with its int8 variant."""
    import torch

    from compressor.export import export_model
    from compressor.models import build_model
    from compressor.quantize import add_int8_variant

    torch.manual_seed(0)
    model = prune_layerwise(mlp3072() if name == "mlp3072" else build_model(name), sparsity)
    export_model(model, out, force=True)
    add_int8_variant(out, data_spec=None, input_shape=tuple(model.input_shape), warn=lambda _: None)
    return out


def export_trained(sparsity: float, out: Path, runs: Path) -> Path:
    """digits-wide-mlp from a real compress run to ``sparsity`` (sharing one dense training)."""
    import torch

    from compressor.config import PruneConfig
    from compressor.data import load_data
    from compressor.export import export_run_dir
    from compressor.models import build_model, input_shape_of
    from compressor.pipeline import compress
    from compressor.quantize import add_int8_variant

    run_dir = runs / f"run-{int(sparsity * 100)}"
    dense = runs / "run-90" / "dense" / "final.pt"
    if not (run_dir / "metrics.json").exists():
        torch.manual_seed(0)
        model = build_model("digits-wide-mlp")
        train, test = load_data("digits", input_shape_of(model), 64, 0)
        level = max(sparsity, 0.9)
        config = PruneConfig(epochs=6, lr=0.05, lr_drops=(4,), target_sparsity=level, prune_fraction=level,
                             rewind_epoch=1, seed=0)
        pretrained = torch.load(dense, weights_only=True)["model"] if dense.exists() else None
        torch.set_num_threads(1)
        compress(model, train, test, config, out=run_dir, device="cpu", model_name="digits-wide-mlp",
                 data_name="digits", pretrained=pretrained)
    export_run_dir(run_dir, out, level=0 if sparsity == 0 else None, force=True)
    add_int8_variant(out, data_spec="digits", input_shape=(64,), warn=lambda _: None)
    return out


def manifest_of(model_dir: Path) -> Dict[str, Any]:
    return json.loads((model_dir / "manifest.json").read_text())


def variant(manifest: Dict[str, Any], name: str) -> Dict[str, Any]:
    return next((v for v in manifest.get("variants", []) if v["name"] == name), {})


def best_of(reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    report = dict(min(reports, key=lambda r: r["latency_ms"]["p50"]))
    report["peak_rss_mb"] = max(r["peak_rss_mb"] for r in reports)
    return report


def measure(dirs: Dict[float, Path], threads: int, args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Baselines on the dense model and auto on every sparsity, taking turns for ``args.rounds`` rounds."""
    configs = [(kernels, dirs[0.0]) for kernels in BASELINES] + [("auto", d) for d in dirs.values()]
    reports: Dict[str, List[Dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for kernels, model_dir in configs:
            key = kernels if kernels != "auto" else f"auto/{model_dir.name}"
            reports.setdefault(key, []).append(bench(model_dir, kernels, threads, args.min_seconds, args.iters))
    return {key: best_of(runs) for key, runs in reports.items()}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    threads_list = list(args.threads)
    results: Dict[str, Any] = {"threads": threads_list, "models": {}}
    with tempfile.TemporaryDirectory(prefix="edgeprune-quantize-bench-") as temp:
        root = Path(temp)
        for name in args.models:
            dirs = {}
            for sparsity in args.sparsities:
                out = root / f"{name}-{int(sparsity * 100)}"
                dirs[sparsity] = (export_trained(sparsity, out, root / "runs") if name == "digits-wide-mlp"
                                  else export_random(name, sparsity, out))
                print(f"exported {out.name}", file=sys.stderr, flush=True)
            dense = manifest_of(dirs[0.0])
            rows = []
            for threads in threads_list:
                measured = measure(dirs, threads, args)
                for sparsity, model_dir in dirs.items():
                    manifest = manifest_of(model_dir)
                    rows.append({"sparsity": sparsity, "threads": threads,
                                 "ort": measured["ort"], "ort-int8": measured["ort-int8"],
                                 "auto": measured[f"auto/{model_dir.name}"],
                                 "dense_fp32_bytes": variant(dense, "fp32").get("size"),
                                 "dense_int8_bytes": variant(dense, "int8").get("size"),
                                 "dense_fp32_accuracy": variant(dense, "fp32").get("accuracy"),
                                 "dense_int8_accuracy": variant(dense, "int8").get("accuracy"),
                                 "pruned_fp32_bytes": variant(manifest, "fp32").get("size"),
                                 "pruned_int8_bytes": variant(manifest, "int8").get("size"),
                                 "pruned_fp32_accuracy": variant(manifest, "fp32").get("accuracy"),
                                 "pruned_int8_accuracy": variant(manifest, "int8").get("accuracy")})
                    auto = rows[-1]["auto"]
                    print(f"{name} {sparsity:.0%} x{threads}: auto {auto['latency_ms']['p50']:.3f} ms "
                          f"({auto['engine']}), ort {measured['ort']['latency_ms']['p50']:.3f}, "
                          f"int8 {measured['ort-int8']['latency_ms']['p50']:.3f}", file=sys.stderr, flush=True)
            results["models"][name] = rows
    return results


def _acc(value: Optional[float]) -> str:
    return f"{value:.1%}" if isinstance(value, float) else "-"


def tables(results: Dict[str, Any]) -> str:
    """Markdown: one table per model; speed-ups are p50 ratios measured in the same run."""
    lines: List[str] = []
    for name, rows in results["models"].items():
        lines += [f"\n### {name}, batch 1 (p50 / p90 ms; RSS MB; size KiB)",
                  "| sparsity | thr | ort fp32 dense | ort int8 dense | auto (pruned, --quantize int8) | auto engine "
                  "| auto vs best dense | auto vs int8 | auto vs fp32 | RSS fp32/int8/auto | size fp32/int8/auto dir "
                  "| acc fp32/int8 dense | acc auto |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            o, q, a = (row[k]["latency_ms"] for k in ("ort", "ort-int8", "auto"))
            auto = row["auto"]
            dir_kib = (auto["model"]["size_bytes"]) / 1024
            lines.append(
                f"| {row['sparsity']:.0%} | {row['threads']} | {o['p50']:.3f} / {o['p90']:.3f} "
                f"| {q['p50']:.3f} / {q['p90']:.3f} | {a['p50']:.3f} / {a['p90']:.3f} | {auto['engine']} "
                f"| {min(o['p50'], q['p50']) / a['p50']:.2f}x | {q['p50'] / a['p50']:.2f}x "
                f"| {o['p50'] / a['p50']:.2f}x "
                f"| {row['ort']['peak_rss_mb']:.0f}/{row['ort-int8']['peak_rss_mb']:.0f}/{auto['peak_rss_mb']:.0f} "
                f"| {row['dense_fp32_bytes'] / 1024:.0f}/{row['dense_int8_bytes'] / 1024:.0f}/{dir_kib:.0f} "
                f"| {_acc(row['dense_fp32_accuracy'])}/{_acc(row['dense_int8_accuracy'])} "
                f"| {_acc((auto.get('variant') or {}).get('accuracy'))} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of >= 0.2 s, 20 runs (default 3 x 0.5 s, 50)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sparsities", type=float, nargs="*", default=list(SPARSITIES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--out", type=Path, default=Path("quantize_bench.json"), help="JSON results file")
    parser.add_argument("--tables-from", type=Path, metavar="JSON", help="only print the tables of an earlier run")
    args = parser.parse_args(argv)
    if args.tables_from:
        print(tables(json.loads(args.tables_from.read_text())))
        return 0
    if 0.0 not in args.sparsities:
        args.sparsities = [0.0, *args.sparsities]  # the dense model is every row's reference
    args.min_seconds, args.iters, args.rounds = (0.2, 20, 2) if args.quick else (0.5, 50, 3)
    results = run(args)
    args.out.write_text(json.dumps(results, indent=1))
    print(tables(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
