"""``auto`` on a plain export against onnxruntime's own engines, and what loading costs (issue 19).

    python3 benchmarks/studies/engines.py                       # quick grid: hidden 1024,4096 × 0/95/98%
    python3 benchmarks/studies/engines.py --full                # hidden 512..4096 × 0/90/95/98%
    python3 benchmarks/studies/engines.py --hidden 2048 --sparsity 0.95 --threads 1 --json out.json

Rows: an MLP 64→H→H→10 (random weights, pruned by global magnitude), batch 1, 1 and 2 threads.
Columns, measured in one process, taking turns call by call in rounds: dense onnxruntime fp32 on the
unpruned model, dense onnxruntime int8 (``onnxruntime.quantization.quantize_dynamic``, symmetric int8
weights) on the unpruned model, and ``edge_runtime.InferenceSession(kernels="auto")`` on the pruned
model's plain (compact fp32) export: p50 and p90 per call, and the engine ``auto`` chose. ``vs best``
is the faster dense engine's p50 divided by auto's (the issue's goal: at least 0.95 on every row).

Then a conv stem (32/64/64 on 3×8×8) + 4096→3072→3072→10 head pruned to 98%: the whole-model engines
(onnxruntime fp32 and int8, native sparse), the per-part split (partition.py: stem in onnxruntime, head
native) and ``auto`` (goal: ≥ 1.3× the best whole-model engine).

Then the load times of a mobilenet_v2-shaped net (3×224×224, 50% pruned; the hand-built network of
depthwise_runtime.py, no torchvision needed): onnxruntime's session creation on the same model as one
plain ONNX file, ``auto``'s first load (no cached plan: tuning included) and its cached load (goals:
≤ 3× and ≤ 2× onnxruntime's). Each figure is the fastest of a few tries. Prints Markdown tables and
writes JSON. The MLP rows compare p50s; loading is a matter of the fastest try, since a busy machine
only ever makes a load slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS reads it at import: the native dense kernels
REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

QUICK = {"hidden": [1024, 4096], "sparsity": [0.0, 0.95, 0.98]}
FULL = {"hidden": [512, 1024, 2048, 4096], "sparsity": [0.0, 0.9, 0.95, 0.98]}


def mlp(hidden: int, sparsity: float) -> Any:
    """64→hidden→hidden→10 with seeded random weights, the smallest ``sparsity`` of them zeroed globally."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10)).eval()
    model.input_shape = (64,)
    if sparsity > 0:
        weights = [m.weight for m in model if isinstance(m, nn.Linear)]
        magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
        threshold = magnitudes.kthvalue(int(sparsity * magnitudes.numel())).values
        with torch.no_grad():
            for w in weights:
                w.mul_((w.abs() > threshold).to(w.dtype))
    return model


def export_pair(model: Any, root: Path, name: str) -> Dict[str, Path]:
    """The model's compact MODEL_DIR and the same model as one plain fp32 ONNX file."""
    from compressor.export import export_model
    from edge_runtime.onnx_embed import model_dir_to_onnx

    folder = root / name
    export_model(model, folder, force=True, source={"model": name, "benchmark": True})
    plain = root / f"{name}.onnx"
    plain.write_bytes(model_dir_to_onnx(folder))
    return {"dir": folder, "onnx": plain}


def quantize(source: Path) -> Path:
    """onnxruntime's dynamic int8 quantization of a fp32 ONNX file (its own default path for MLPs)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = source.with_suffix(".int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice ("consider pre-processing") is not a result
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                         extra_options={"WeightSymmetric": True})
    finally:
        root.setLevel(level)
    return target


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latencies(engines: Dict[str, Callable[[], Any]], rounds: int, calls: int) -> Dict[str, Dict[str, float]]:
    """p50/p90 milliseconds per engine; engines take turns, ``calls`` calls each per round."""
    times: Dict[str, List[float]] = {name: [] for name in engines}
    for fn in engines.values():
        fn()
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90))} for name, t in times.items()}


def mlp_rows(hidden_sizes: List[int], sparsities: List[float], threads: List[int], rounds: int, calls: int,
             root: Path) -> List[Dict[str, Any]]:
    from edge_runtime import InferenceSession

    rows = []
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    for hidden in hidden_sizes:
        dense = export_pair(mlp(hidden, 0.0), root, f"mlp{hidden}-dense")
        int8 = quantize(dense["onnx"])
        for sparsity in sparsities:
            pruned = export_pair(mlp(hidden, sparsity), root, f"mlp{hidden}-{int(sparsity * 100)}")
            for count in threads:
                fp32, q8 = ort_session(dense["onnx"], count), ort_session(int8, count)
                auto = InferenceSession(pruned["dir"], kernels="auto", threads=count)
                name = auto.get_inputs()[0].name
                measured = latencies({"ort fp32": lambda: fp32.run(None, {fp32.get_inputs()[0].name: x}),
                                      "ort int8": lambda: q8.run(None, {q8.get_inputs()[0].name: x}),
                                      "auto": lambda: auto.run(None, {name: x})}, rounds, calls)
                best = min(measured["ort fp32"]["p50"], measured["ort int8"]["p50"])
                rows.append({"hidden": hidden, "sparsity": sparsity, "threads": count, "ms": measured,
                             "engine": auto.engine, "vs_best": best / measured["auto"]["p50"]})
                print(_mlp_line(rows[-1]), flush=True)
                auto.close()
    return rows


def _mlp_line(row: Dict[str, Any]) -> str:
    ms = row["ms"]
    cells = " | ".join(f"{ms[k]['p50']:.3f} / {ms[k]['p90']:.3f}" for k in ("ort fp32", "ort int8", "auto"))
    return f"| {row['hidden']} | {row['sparsity']:.0%} | {row['threads']} | {cells} | {row['engine']} | {row['vs_best']:.2f}× |"


def stem_head(sparsity: float) -> Any:
    """A conv stem 32/64/64 on 3×8×8 and a 4096→3072→3072→10 head, the head pruned to ``sparsity``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]  # noqa: E731
    model = nn.Sequential(*conv(3, 32), *conv(32, 64), *conv(64, 64), nn.Flatten(), nn.Linear(4096, 3072),
                          nn.ReLU(), nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 10)).eval()
    model.input_shape = (3, 8, 8)
    head = [m.weight for m in model if isinstance(m, nn.Linear)]
    threshold = torch.cat([w.detach().abs().flatten() for w in head]).kthvalue(
        int(sparsity * sum(w.numel() for w in head))).values
    with torch.no_grad():
        for w in head:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return model


def stem_rows(threads: List[int], rounds: int, calls: int, root: Path, sparsity: float = 0.98) -> List[Dict[str, Any]]:
    """The conv stem + wide head: every whole-model engine, the split (partition.py) and auto."""
    from edge_runtime import InferenceSession

    pair = export_pair(stem_head(sparsity), root, "stem-head")
    int8 = quantize(pair["onnx"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    rows = []
    for count in threads:
        fp32, q8 = ort_session(pair["onnx"], count), ort_session(int8, count)
        ours = {kernels: InferenceSession(pair["dir"], kernels=kernels, threads=count)
                for kernels in ("sparse", "split", "auto")}
        name = ours["auto"].get_inputs()[0].name
        engines = {"ort fp32": lambda: fp32.run(None, {fp32.get_inputs()[0].name: x}),
                   "ort int8": lambda: q8.run(None, {q8.get_inputs()[0].name: x})}
        engines.update({f"{k}": (lambda s=s: s.run(None, {name: x})) for k, s in ours.items()})
        measured = latencies(engines, rounds, calls)
        best_whole = min(measured[k]["p50"] for k in ("ort fp32", "ort int8", "sparse"))
        rows.append({"sparsity": sparsity, "threads": count, "ms": measured, "engine": ours["auto"].engine,
                     "split_vs_best_whole": best_whole / measured["split"]["p50"],
                     "auto_vs_best_whole": best_whole / measured["auto"]["p50"]})
        print(_stem_line(rows[-1]), flush=True)
    return rows


def _stem_line(row: Dict[str, Any]) -> str:
    ms = row["ms"]
    cells = " | ".join(f"{ms[k]['p50']:.3f} / {ms[k]['p90']:.3f}" for k in ("ort fp32", "ort int8", "sparse", "split", "auto"))
    return (f"| {row['sparsity']:.0%} | {row['threads']} | {cells} | {row['engine']} | "
            f"{row['split_vs_best_whole']:.2f}× | {row['auto_vs_best_whole']:.2f}× |")


def load_times(root: Path, tries: int) -> Dict[str, Any]:
    """Fastest of ``tries`` loads each: onnxruntime on the plain file, auto tuning, auto with a cached plan."""
    from benchmarks.studies.depthwise_runtime import mobilenet_like
    from edge_runtime import InferenceSession
    from edge_runtime.plan import PLAN_FILE

    model = mobilenet_like(224)
    import torch
    from torch import nn

    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    threshold = torch.cat([w.detach().abs().flatten() for w in weights]).quantile(0.5)
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    pair = export_pair(model, root, "mobilenet_v2-224")
    home_cache = Path.home() / ".cache" / "edge-runtime" / PLAN_FILE

    def first() -> None:
        (pair["dir"] / PLAN_FILE).unlink(missing_ok=True)
        InferenceSession(pair["dir"], kernels="auto", threads=1)

    figures: Dict[str, List[float]] = {"onnxruntime session": [], "auto, first load (tuning)": [],
                                       "auto, cached plan": []}
    loads = {"onnxruntime session": lambda: ort_session(pair["onnx"], 1), "auto, first load (tuning)": first,
             "auto, cached plan": lambda: InferenceSession(pair["dir"], kernels="auto", threads=1)}
    for fn in loads.values():
        fn()  # imports and first-touch costs are not the model's
    for _ in range(tries):
        for name, fn in loads.items():
            start = time.perf_counter()
            fn()
            figures[name].append(time.perf_counter() - start)
    engine = InferenceSession(pair["dir"], kernels="auto", threads=1)
    seconds = {name: min(values) for name, values in figures.items()}
    base = seconds["onnxruntime session"]
    return {"seconds": seconds, "ratio": {name: s / base for name, s in seconds.items()}, "engine": engine.engine,
            "skipped": engine.plan.get("skipped"), "home_cache_used": home_cache.exists()}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="hidden 512/1024/2048/4096 × 0/90/95/98%%")
    parser.add_argument("--hidden", help="comma-separated hidden widths (default: the quick grid's)")
    parser.add_argument("--sparsity", help="comma-separated fractions, e.g. 0,0.9,0.98")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="calls per engine per round")
    parser.add_argument("--load-tries", type=int, default=3)
    parser.add_argument("--no-load", action="store_true", help="skip the mobilenet_v2 load times")
    parser.add_argument("--json", default="engines_bench.json")
    args = parser.parse_args(argv)
    grid = FULL if args.full else QUICK
    hidden = [int(h) for h in args.hidden.split(",")] if args.hidden else grid["hidden"]
    sparsity = [float(s) for s in args.sparsity.split(",")] if args.sparsity else grid["sparsity"]
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgeprune-engines-") as scratch:
        print("| hidden | sparsity | threads | ort fp32 p50 / p90 ms | ort int8 p50 / p90 ms | auto p50 / p90 ms "
              "| auto engine | vs best |\n|---:|---:|---:|---|---|---|---|---:|", flush=True)
        rows = mlp_rows(hidden, sparsity, threads, args.rounds, args.calls, Path(scratch))
        print("\n| conv stem + 4096→3072→3072→10 head | threads | ort fp32 p50 / p90 ms | ort int8 | native (sparse) "
              "| split | auto | auto engine | split vs best whole | auto vs best whole |\n"
              "|---:|---:|---|---|---|---|---|---|---:|---:|", flush=True)
        stem = stem_rows(threads, args.rounds, args.calls, Path(scratch))
        load = None if args.no_load else load_times(Path(scratch), args.load_tries)
    if load:
        print("\n| mobilenet_v2 224² load | seconds | × onnxruntime |\n|---|---:|---:|")
        for name, seconds in load["seconds"].items():
            print(f"| {name} | {seconds:.3f} | {load['ratio'][name]:.2f}× |")
        print(f"auto runs it in: {load['engine']}" + (f" ({load['skipped']['native']})" if load["skipped"] else ""))
    Path(args.json).write_text(json.dumps({"mlp": rows, "stem_head": stem, "load": load}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
