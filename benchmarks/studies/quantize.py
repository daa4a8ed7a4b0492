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

A second table gives each MODEL_DIR's shipped size against the dense fp32 ONNX: the external layout
(format 1), and compact storage (format 3) with float32, float16 and int8 values — the auto rows run the
compact int8 folders, what `edgeprune export --quantize int8` writes. ``--sizes-only`` skips the timing.
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
from edge_runtime.safe_io import atomic_write_text

SPARSITIES = (0.0, 0.9, 0.95, 0.98)
BASELINES = ("ort", "ort-int8")   # on the dense model
MODELS = ("digits-wide-mlp", "mlp3072", "resnet20")


def mlp3072() -> Any:
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 3072), nn.ReLU(), nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 10))
    model.input_shape = (64,)
    return model


def export_random(name: str, sparsity: float, out: Path) -> Path:
    """A random-weight model pruned by magnitude (per layer), exported (external layout, fp32)."""
    import torch

    from compressor.export import export_model
    from compressor.models import build_model

    torch.manual_seed(0)
    model = prune_layerwise(mlp3072() if name == "mlp3072" else build_model(name), sparsity)
    export_model(model, out, force=True, layout="external")
    return out


def layouts(source: Path, data_spec: Optional[str]) -> Dict[str, Path]:
    """From one external-layout fp32 export: the same model with its int8 variant (external: the dense
    baselines), and compact (format 3) with float32, float16 and int8 values — what `edgeprune export`
    writes with no option, --quantize fp16 and --quantize int8."""
    import shutil

    from compressor.compact import compact_model_dir
    from compressor.quantize import add_int8_variant

    shape = tuple(int(d) for d in manifest_of(source)["input"]["shape"][1:])
    made = {}
    for kind in ("external-int8", "fp32", "fp16", "int8"):
        target = source.with_name(f"{source.name}-{kind}")
        shutil.copytree(source, target)
        if kind.endswith("int8"):
            add_int8_variant(target, data_spec=data_spec, input_shape=shape, warn=lambda _: None)
        if not kind.startswith("external"):
            compact_model_dir(target, "float16" if kind == "fp16" else "float32")
            if kind == "int8":
                from compressor.quantize import refresh_fp32_accuracy

                refresh_fp32_accuracy(target, manifest_of(target))
        made[kind] = target
    return made


def export_trained(sparsity: float, out: Path, runs: Path) -> Path:
    """digits-wide-mlp from a real compress run to ``sparsity`` (sharing one dense training)."""
    import torch

    from compressor.config import PruneConfig
    from compressor.data import load_data
    from compressor.export import export_run_dir
    from compressor.models import build_model, input_shape_of
    from compressor.pipeline import compress

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
    export_run_dir(run_dir, out, level=0 if sparsity == 0 else None, force=True, layout="external")
    return out


def manifest_of(model_dir: Path) -> Dict[str, Any]:
    return json.loads((model_dir / "manifest.json").read_text())


def variant(manifest: Dict[str, Any], name: str) -> Dict[str, Any]:
    return next((v for v in manifest.get("variants", []) if v["name"] == name), {})


def best_of(reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    report = dict(min(reports, key=lambda r: r["latency_ms"]["p50"]))
    report["peak_rss_mb"] = max(r["peak_rss_mb"] for r in reports)
    return report


def measure(dense: Path, dirs: Dict[float, Path], threads: int, args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Baselines on the dense model and auto on every sparsity, taking turns for ``args.rounds`` rounds."""
    configs = [(kernels, dense) for kernels in BASELINES] + [("auto", d) for d in dirs.values()]
    reports: Dict[str, List[Dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for kernels, model_dir in configs:
            key = kernels if kernels != "auto" else f"auto/{model_dir.name}"
            reports.setdefault(key, []).append(bench(model_dir, kernels, threads, args.min_seconds, args.iters))
    return {key: best_of(runs) for key, runs in reports.items()}


def shipped(model_dir: Path) -> int:
    from edge_runtime.model_dir import read_manifest
    from edge_runtime.model_format import shipped_bytes

    return shipped_bytes(model_dir, read_manifest(model_dir))


def run(args: argparse.Namespace) -> Dict[str, Any]:
    threads_list = list(args.threads)
    results: Dict[str, Any] = {"threads": threads_list, "models": {}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="edgeprune-quantize-bench-") as temp:
        root = Path(temp)
        for name in args.models:
            made: Dict[float, Dict[str, Path]] = {}
            data_spec = "digits" if name == "digits-wide-mlp" else None
            for sparsity in args.sparsities:
                out = root / f"{name}-{int(sparsity * 100)}"
                source = (export_trained(sparsity, out, root / "runs") if name == "digits-wide-mlp"
                          else export_random(name, sparsity, out))
                made[sparsity] = {"external": source, **layouts(source, data_spec)}
                print(f"exported {out.name}", file=sys.stderr, flush=True)
            results["sizes"][name] = [
                {"sparsity": sparsity, "dense_onnx": manifest_of(paths["external"])["sizes"]["dense_onnx"],
                 **{kind: shipped(path) for kind, path in paths.items() if kind != "external-int8"},
                 "accuracy": {kind: {v["name"]: v.get("accuracy") for v in manifest_of(path).get("variants", [])}
                              for kind, path in paths.items() if kind in ("external-int8", "int8")}}
                for sparsity, paths in made.items()]
            dense_dir = made[0.0]["external-int8"]
            dense = manifest_of(dense_dir)
            dirs = {sparsity: paths["int8"] for sparsity, paths in made.items()}
            rows = []
            for threads in ([] if args.sizes_only else threads_list):
                measured = measure(dense_dir, dirs, threads, args)
                for sparsity, model_dir in dirs.items():
                    manifest = manifest_of(model_dir)
                    rows.append({"sparsity": sparsity, "threads": threads,
                                 "ort": measured["ort"], "ort-int8": measured["ort-int8"],
                                 "auto": measured[f"auto/{model_dir.name}"],
                                 "dense_fp32_bytes": dense["sizes"]["dense_onnx"],
                                 "dense_int8_bytes": dense["sizes"]["model.int8.onnx"],
                                 "dense_fp32_accuracy": variant(dense, "fp32").get("accuracy"),
                                 "dense_int8_accuracy": variant(dense, "int8").get("accuracy"),
                                 "pruned_fp32_accuracy": variant(manifest, "fp32").get("accuracy"),
                                 "pruned_int8_accuracy": variant(manifest, "int8").get("accuracy")})
                    auto = rows[-1]["auto"]
                    print(f"{name} {sparsity:.0%} x{threads}: auto {auto['latency_ms']['p50']:.3f} ms "
                          f"({auto['engine']}), ort {measured['ort']['latency_ms']['p50']:.3f}, "
                          f"int8 {measured['ort-int8']['latency_ms']['p50']:.3f}", file=sys.stderr, flush=True)
            results["models"][name] = rows
    return results


def size_tables(results: Dict[str, Any]) -> str:
    """Markdown: shipped MODEL_DIR bytes against the dense fp32 ONNX, per layout and value type."""
    lines = ["\n### MODEL_DIR size (KiB; × smaller than the dense fp32 ONNX)",
             "| model | sparsity | dense ONNX | external fp32 (format 1) | compact fp32 | compact fp16 | compact int8 "
             "| acc fp32 → int8 (compact) |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.get("sizes", {}).items():
        for row in rows:
            dense = row["dense_onnx"]
            cell = lambda kind: f"{row[kind] / 1024:.0f} ({dense / row[kind]:.1f}×)"
            acc = row["accuracy"].get("int8", {})
            lines.append(f"| {name} | {row['sparsity']:.0%} | {dense / 1024:.0f} | {cell('external')} | {cell('fp32')} "
                         f"| {cell('fp16')} | {cell('int8')} | {_acc(acc.get('fp32'))} → {_acc(acc.get('int8'))} |")
    return "\n".join(lines)


def _acc(value: Optional[float]) -> str:
    return f"{value:.1%}" if isinstance(value, float) else "-"


def tables(results: Dict[str, Any]) -> str:
    """Markdown: one table per model; speed-ups are p50 ratios measured in the same run."""
    lines: List[str] = []
    for name, rows in results["models"].items():
        lines += [f"\n### {name}, batch 1 (p50 / p90 ms; RSS MB; size KiB)",
                  "| sparsity | thr | ort fp32 dense | ort int8 dense | auto (pruned, --quantize int8) | auto engine "
                  "| auto vs best dense | auto vs int8 | auto vs fp32 | RSS fp32/int8/auto | size fp32/int8/auto "
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
    parser.add_argument("--sizes-only", action="store_true", help="export and print the size table, no timing")
    parser.add_argument("--tables-from", type=Path, metavar="JSON", help="only print the tables of an earlier run")
    args = parser.parse_args(argv)
    if args.tables_from:
        earlier = json.loads(args.tables_from.read_text())
        print(tables(earlier))
        print(size_tables(earlier))
        return 0
    if 0.0 not in args.sparsities:
        args.sparsities = [0.0, *args.sparsities]  # the dense model is every row's reference
    args.min_seconds, args.iters, args.rounds = (0.2, 20, 2) if args.quick else (0.5, 50, 3)
    results = run(args)
    atomic_write_text(args.out, json.dumps(results, indent=1))
    print(tables(results))
    print(size_tables(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
