"""``auto`` on the MODEL_DIR a user's default export writes, against onnxruntime's own engines (issue 19).

    python3 benchmarks/studies/engines.py                       # quick grid: hidden 1024,4096 × 0/95/98%
    python3 benchmarks/studies/engines.py --full                # hidden 512..4096 × 0/90/95/98%
    python3 benchmarks/studies/engines.py --hidden 2048 --sparsity 0.95 --threads 1 --json out.json

Every pruned model is exported as ``edgeprune export`` does by default (``--quantize auto`` with data):
the fp32 MODEL_DIR, its int8 variant built by compressor/export/quantize.py (calibrated on the data and
kept when within 1 accuracy point, export_cli.AUTO_MAX_DROP), then compacted (format 3). ``auto`` runs
on that MODEL_DIR. The dense baselines are onnxruntime on the *unpruned* model: fp32, and int8 from
onnxruntime's own quantizers with their defaults — ``quantize_dynamic`` (int8 weights, activations
quantized per call) and ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
calibrated on the same batches) — both timed; ``dense int8`` is the faster of the two in that row.

Rows: an MLP 64→H→H→10 trained briefly on scikit-learn's digits (so accuracy means something), pruned
layer by layer by magnitude without fine-tuning, batch 1, 1 and 2 threads. Then three convolutional nets with
random weights, pruned layer by layer by magnitude: a conv stem (32/64/64 on 3×8×8) + 4096→3072→3072→10 head
at 98% (goal: ``auto`` ≥ 1.3× the best whole-model engine; the native ``sparse`` engine and the
per-part ``split`` are timed too), resnet20 at 90%, and a mobilenet_v2-shaped net (3×224×224) at 50%;
their data is seeded noise labelled by the unpruned model's top-1, so their "accuracy" is agreement
with the dense fp32 model. Engines take turns call by call in rounds, in one process: p50 and p90 per
call; ``vs best`` is the fastest dense engine's p50 over auto's (goal: ≥ 0.95 on every row), where a
dense int8 engine counts only if its accuracy is within 1 point of dense fp32 (export's rule for
keeping our own int8 variant: a user would not ship one that loses more). RSS is the
process's resident growth when each engine is loaded and first run (MiB; engines load in turn, so it
is indicative), size the bytes each ships.

Then the load times of the mobilenet_v2-shaped net: onnxruntime's session creation on the same model
as one plain ONNX file, ``auto``'s first load (no cached plan: tuning included) and its cached load
(goals: ≤ 3× and ≤ 2× onnxruntime's). Each figure is the fastest of a few tries. Prints Markdown tables
and writes JSON.
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
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS reads it at import: the native dense kernels
REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

DATA_ROOT = "data"         # the conv nets' noise data and its factory, under the scratch folder
QUICK = {"hidden": [1024, 4096], "sparsity": [0.0, 0.95, 0.98]}
FULL = {"hidden": [512, 1024, 2048, 4096], "sparsity": [0.0, 0.9, 0.95, 0.98]}


def mlp(hidden: int, epochs: int = 3) -> Any:
    """64→hidden→hidden→10 with seeded weights, trained ``epochs`` on the digits' training split."""
    import torch
    from torch import nn

    from compressor.train.data import load_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    model.input_shape = (64,)
    train, _ = load_data("digits", (64,), 64, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for _ in range(epochs):
        for x, y in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def pruned(model: Any, sparsity: float, kinds: tuple = ("Linear",)) -> Any:
    """A copy of ``model`` with the smallest ``sparsity`` of each ``kinds`` layer's weights zeroed.

    Layer by layer, not globally: a global threshold on the trained MLP puts every survivor of a 98%
    level in the first layer (its weights are the largest), zeroing the other two layers whole — a
    model at chance accuracy, whose int8 variant onnxruntime even runs unfused (scale 1.0)."""
    import copy

    import torch

    model = copy.deepcopy(model)
    if sparsity <= 0:
        return model
    with torch.no_grad():
        for layer in model.modules():
            if type(layer).__name__ in kinds:
                w = layer.weight
                threshold = w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
                w.mul_((w.abs() > threshold).to(w.dtype))
    return model


def export_default(model: Any, root: Path, name: str, data: str, calibration_batches: int) -> Dict[str, Any]:
    """``model`` as ``edgeprune export --quantize auto --data DATA`` writes it (see the module docstring),
    and the same fp32 model as one plain ONNX file (what onnxruntime's own engines load)."""
    from compressor.export.compact import compact_model_dir
    from compressor.export.model_dir import export_model
    from compressor.export.quantize import add_int8_variant, refresh_fp32_accuracy
    from compressor.export_cli import AUTO_MAX_DROP
    from edge_runtime.onnx_embed import model_dir_to_onnx

    folder = root / name
    export_model(model, folder, force=True, layout="external", source={"model": name, "benchmark": True,
                                                                        "data": data})
    plain = root / f"{name}.onnx"
    plain.write_bytes(model_dir_to_onnx(folder))
    result = add_int8_variant(folder, data_spec=data, input_shape=model.input_shape,
                              calibration_batches_count=calibration_batches, max_drop=AUTO_MAX_DROP,
                              trusted_data=True, warn=lambda text: print(text, file=sys.stderr))[0]
    manifest = compact_model_dir(folder, "float32")
    if result.shipped:
        refresh_fp32_accuracy(folder, manifest, data, trusted_data=True)
    method = next((v.get("method") for v in manifest.get("variants", []) if v.get("name") == "int8"), None)
    return {"dir": folder, "onnx": plain, "int8": method if result.shipped else f"not shipped: {result.message}"}


def _quiet_quantizer() -> Any:
    """The root logger at ERROR while onnxruntime's quantizer runs (its advice is not a result)."""
    import contextlib

    @contextlib.contextmanager
    def quiet():
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            yield
        finally:
            root.setLevel(level)
    return quiet()


def dense_int8(source: Path, data: str, shape: tuple, calibration_batches: int) -> Dict[str, Path]:
    """onnxruntime's own quantizers on the dense fp32 file, their defaults but symmetric int8 weights:
    ``quantize_dynamic`` and ``quantize_static`` (QDQ, per-channel, calibrated on the export's batches).
    Gemm becomes MatMul + Add first for the dynamic one (its quantizer skips Gemm, as export's does)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from compressor.export.quantize import _Reader, calibration_batches as batches, gemm_to_matmul

    dynamic, static = source.with_suffix(".dynamic.onnx"), source.with_suffix(".static.onnx")
    model = onnx.load(str(source))
    name = model.graph.input[0].name
    gemm_to_matmul(model)
    matmul = source.with_suffix(".matmul.onnx")
    onnx.save(model, str(matmul))
    calibration = batches(data, shape, calibration_batches, trusted=True)
    with _quiet_quantizer():
        quantize_dynamic(str(matmul), str(dynamic), weight_type=QuantType.QInt8,
                         extra_options={"WeightSymmetric": True})
        quantize_static(str(source), str(static), _Reader(name, calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        extra_options={"WeightSymmetric": True})
    return {"ort int8 dynamic": dynamic, "ort int8 static": static}


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def loaded(openers: Dict[str, Callable[[], Any]], x: np.ndarray) -> tuple:
    """Open each engine in turn: ``({name: call}, {name: session}, {name: RSS growth MiB at load + first run})``."""
    calls, sessions, rss = {}, {}, {}
    for name, open_ in openers.items():
        before = rss_mib()
        session = sessions[name] = open_()
        feed = {session.get_inputs()[0].name: x}
        session.run(None, feed)
        rss[name] = rss_mib() - before
        calls[name] = lambda session=session, feed=feed: session.run(None, feed)
    return calls, sessions, rss


def latencies(engines: Dict[str, Callable[[], Any]], rounds: int, calls: int) -> Dict[str, Dict[str, float]]:
    """p50/p90 milliseconds per engine over ``rounds × calls`` calls each, taken call by call in turn,
    in a seeded random order each turn: a burst of other work on this shared machine lands on every
    engine alike instead of on whichever engine's block of calls it hit, and no engine always runs
    after the same other one (whose weights it would find, or not, in the caches)."""
    names = list(engines)
    times: Dict[str, List[float]] = {name: [] for name in names}
    order = np.random.default_rng(0)
    for _ in range(3):
        for fn in engines.values():
            fn()
    for _ in range(rounds * calls):
        for name in order.permutation(names):
            fn = engines[name]
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90))} for name, t in times.items()}


def parts(auto: Any) -> str:
    """The engine of each part ``auto`` runs: one engine, or the split's two parts and their kernels."""
    plan = auto.plan
    if auto.engine == "split":
        kinds = sorted(set((plan.get("layers") or {}).values()))
        return f"split at {plan.get('cut')}: ort | native ({'/'.join(kinds)})"
    if auto.engine == "native":
        kinds = sorted(set((plan.get("layers") or {}).values()))
        return f"native ({'/'.join(kinds)})"
    return auto.engine


def accuracies(sessions: Dict[str, Any], data: str, shape: tuple) -> Dict[str, Optional[float]]:
    from compressor.export.quantize import accuracy_of

    return {name: accuracy_of(session, data, shape, trusted=True) for name, session in sessions.items()}


def sizes(paths: Dict[str, Path], model_dir: Path) -> Dict[str, int]:
    from edge_runtime.model_dir import read_manifest
    from edge_runtime.model_format import shipped_bytes

    out = {name: path.stat().st_size for name, path in paths.items()}
    out["auto"] = shipped_bytes(model_dir, read_manifest(model_dir))
    return out


INT8 = ("ort int8 dynamic", "ort int8 static")


def usable_int8(accuracy: Optional[Dict[str, Optional[float]]]) -> List[str]:
    """The dense int8 engines a user could ship: within export's --max-drop default (AUTO_MAX_DROP
    points) of dense fp32, the rule by which export keeps our own int8 variant. Both without accuracies."""
    from compressor.export_cli import AUTO_MAX_DROP

    if not accuracy or accuracy.get("ort fp32") is None:
        return list(INT8)
    floor = accuracy["ort fp32"] - AUTO_MAX_DROP / 100
    return [k for k in INT8 if accuracy.get(k) is None or accuracy[k] >= floor]


def measure(dense: Dict[str, Path], export: Dict[str, Any], threads: int, rounds: int, calls: int, x: np.ndarray,
            extra: tuple = (), data: Optional[str] = None, shape: tuple = (),
            accuracy: Optional[Dict[str, Optional[float]]] = None) -> Dict[str, Any]:
    """One row: the dense onnxruntime engines, ``extra`` kernels= choices on the export, and auto.
    Accuracies are measured when ``data`` is given (else ``accuracy``, an earlier row's, is kept)."""
    from edge_runtime import InferenceSession

    openers: Dict[str, Callable[[], Any]] = {name: (lambda p=path: ort_session(p, threads)) for name, path in dense.items()}
    for kernels in (*extra, "auto"):
        openers[kernels] = lambda k=kernels: InferenceSession(export["dir"], kernels=k, threads=threads)
    engine_calls, sessions, rss = loaded(openers, x)
    ms = latencies(engine_calls, rounds, calls)
    if data:
        accuracy = accuracies({k: sessions[k] for k in ("ort fp32", *INT8, "auto")}, data, shape)
    usable = usable_int8(accuracy)
    int8 = min(usable or INT8, key=lambda k: ms[k]["p50"])
    best = min([ms["ort fp32"]["p50"]] + [ms[k]["p50"] for k in usable])
    row = {"threads": threads, "ms": ms, "rss_mib": rss, "dense_int8": int8, "engine": parts(sessions["auto"]),
           "variant": export["int8"], "vs_best": best / ms["auto"]["p50"], "accuracy": accuracy,
           "int8_counted": usable, "plan": {k: v for k, v in sessions["auto"].plan.items()
                                            if k not in ("layer_ms", "tuned_at")}}
    for session in sessions.values():
        getattr(session, "close", lambda: None)()
    return row


def mlp_rows(hidden_sizes: List[int], sparsities: List[float], threads: List[int], rounds: int, calls: int,
             root: Path) -> List[Dict[str, Any]]:
    rows = []
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    for hidden in hidden_sizes:
        trained = mlp(hidden)
        base = export_default(trained, root, f"mlp{hidden}-dense", "digits", 8)
        dense = {"ort fp32": base["onnx"], **dense_int8(base["onnx"], "digits", (64,), 8)}
        for sparsity in sparsities:
            export = export_default(pruned(trained, sparsity), root, f"mlp{hidden}-{int(sparsity * 100)}", "digits", 8)
            accuracy = None
            for i, count in enumerate(threads):
                row = measure(dense, export, count, rounds, calls, x, data="digits" if i == 0 else None, shape=(64,),
                              accuracy=accuracy)
                accuracy = row["accuracy"]
                row.update(hidden=hidden, sparsity=sparsity, size=sizes(dense, export["dir"]))
                rows.append(row)
                print(_mlp_line(row), flush=True)
    return rows


MLP_HEADER = ("| hidden | sparsity | thr | ort fp32 p50 / p90 ms | ort int8 dyn | ort int8 static | auto "
              "| auto engine | vs best | acc % fp32 / dyn / static / auto | size KiB fp32 / int8 / auto | RSS MiB int8 / auto |\n"
              "|---:|---:|---:|---|---|---|---|---|---:|---|---|---|")


def _cell(ms: Dict[str, float]) -> str:
    return f"{ms['p50']:.3f} / {ms['p90']:.3f}"


def _accuracy_cell(row: Dict[str, Any]) -> str:
    acc = row.get("accuracy")
    if not acc:
        return ""
    shown = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    return " / ".join(shown(acc.get(k)) for k in ("ort fp32", *INT8, "auto"))


def _size_cell(row: Dict[str, Any]) -> str:
    size = row["size"]
    return " / ".join(f"{size[k] / 1024:.0f}" for k in ("ort fp32", row["dense_int8"], "auto"))


def _mlp_line(row: Dict[str, Any]) -> str:
    ms, rss = row["ms"], row["rss_mib"]
    cells = " | ".join(_cell(ms[k]) for k in ("ort fp32", "ort int8 dynamic", "ort int8 static", "auto"))
    return (f"| {row['hidden']} | {row['sparsity']:.0%} | {row['threads']} | {cells} | {row['engine']} | "
            f"{row['vs_best']:.2f}× | {_accuracy_cell(row)} | {_size_cell(row)} | "
            f"{rss[row['dense_int8']]:.0f} / {rss['auto']:.0f} |")


def stem_head() -> Any:
    """A conv stem 32/64/64 on 3×8×8 and a 4096→3072→3072→10 head (random weights)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]  # noqa: E731
    model = nn.Sequential(*conv(3, 32), *conv(32, 64), *conv(64, 64), nn.Flatten(), nn.Linear(4096, 3072),
                          nn.ReLU(), nn.Linear(3072, 3072), nn.ReLU(), nn.Linear(3072, 10)).eval()
    model.input_shape = (3, 8, 8)
    return model


def resnet20() -> Any:
    import torch

    from compressor.train.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    model.input_shape = (3, 32, 32)
    return model


def noise_data(dense: Any, root: Path, name: str, count: int = 64) -> str:
    """A ``file.py:factory`` data spec: seeded noise of the model's input shape labelled by the dense
    model's own top-1 (random weights have no task; agreement with the dense model is the accuracy)."""
    import torch

    folder = root / DATA_ROOT
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * count, *dense.input_shape)).astype(np.float32)
    with torch.no_grad():
        y = dense(torch.from_numpy(x)).argmax(dim=1).numpy()
    np.savez(folder / f"{name}.npz", x=x, y=y)
    (folder / f"{name}.py").write_text(
        "import numpy as np\nimport torch\nfrom torch.utils.data import TensorDataset\n\n\ndef factory():\n"
        f"    with np.load({str(folder / f'{name}.npz')!r}) as data:\n"
        "        x, y = torch.from_numpy(data['x']), torch.from_numpy(data['y'])\n"
        f"    return TensorDataset(x[:{count}], y[:{count}]), TensorDataset(x[{count}:], y[{count}:])\n")
    return f"{folder / name}.py:factory"


CONV_NETS = {  # name: (builder, sparsity, layers pruned, calibration batches of 32, extra kernels= timed)
    "stem + head": (stem_head, 0.98, ("Linear",), 2, ("sparse", "split")),
    "resnet20": (resnet20, 0.90, ("Conv2d", "Linear"), 2, ()),
    "mobilenet_v2 224²": (lambda: mobilenet(224), 0.50, ("Conv2d", "Linear"), 1, ()),
}


def mobilenet(size: int) -> Any:
    from benchmarks.studies.depthwise_runtime import mobilenet_like

    return mobilenet_like(size)


def conv_rows(names: List[str], threads: List[int], rounds: int, calls: int, root: Path) -> List[Dict[str, Any]]:
    """The convolutional nets: dense onnxruntime engines, the named extra engines on the export, auto."""
    rows = []
    for name in names:
        build, sparsity, kinds, batches, extra = CONV_NETS[name]
        dense_model = build()
        slug = name.split()[0].replace("+", "")
        data = noise_data(dense_model, root, slug)
        base = export_default(dense_model, root, f"{slug}-dense", data, batches)
        shape = tuple(dense_model.input_shape)
        dense = {"ort fp32": base["onnx"], **dense_int8(base["onnx"], data, shape, batches)}
        export = export_default(pruned(dense_model, sparsity, kinds), root, f"{slug}-{int(sparsity * 100)}", data, batches)
        x = np.random.default_rng(1).standard_normal((1, *shape)).astype(np.float32)
        accuracy = None
        for i, count in enumerate(threads):
            row = measure(dense, export, count, rounds, calls, x, extra, data if i == 0 else None, shape, accuracy)
            accuracy = row["accuracy"]
            row.update(model=name, sparsity=sparsity, size=sizes(dense, export["dir"]))
            whole = [k for k in ("ort fp32", *row["int8_counted"], "sparse") if k in row["ms"]]
            best_whole = min(row["ms"][k]["p50"] for k in whole)
            row["auto_vs_best_whole"] = best_whole / row["ms"]["auto"]["p50"]
            if "split" in row["ms"]:
                row["split_vs_best_whole"] = best_whole / row["ms"]["split"]["p50"]
            rows.append(row)
            print(_conv_line(row), flush=True)
    return rows


CONV_HEADER = ("| model | sparsity | thr | ort fp32 p50 / p90 ms | ort int8 dyn | ort int8 static | native (sparse) "
               "| split | auto | auto engine | vs best dense | auto vs best whole | acc % fp32 / dyn / static / auto "
               "| size KiB fp32 / int8 / auto | RSS MiB int8 / auto |\n"
               "|---|---:|---:|---|---|---|---|---|---|---|---:|---:|---|---|---|")


def _conv_line(row: Dict[str, Any]) -> str:
    ms, rss = row["ms"], row["rss_mib"]
    cells = " | ".join(_cell(ms[k]) if k in ms else "–" for k in ("ort fp32", "ort int8 dynamic", "ort int8 static",
                                                                    "sparse", "split", "auto"))
    return (f"| {row['model']} | {row['sparsity']:.0%} | {row['threads']} | {cells} | {row['engine']} | "
            f"{row['vs_best']:.2f}× | {row['auto_vs_best_whole']:.2f}× | {_accuracy_cell(row)} | {_size_cell(row)} | "
            f"{rss[row['dense_int8']]:.0f} / {rss['auto']:.0f} |")


def load_times(root: Path, tries: int) -> Dict[str, Any]:
    """Fastest of ``tries`` loads each: onnxruntime on the plain file, auto tuning, auto with a cached plan."""
    from benchmarks.studies.depthwise_runtime import mobilenet_like
    from edge_runtime import InferenceSession
    from edge_runtime.plan import PLAN_FILE

    model = pruned(mobilenet_like(224), 0.5, ("Conv2d", "Linear"))
    pair = export_default(model, root, "mobilenet_v2-224-load", noise_data(model, root, "mobilenet-load", 32), 1)
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
    parser.add_argument("--conv", help="comma-separated conv nets to run: stem,resnet20,mobilenet_v2 (default all; "
                        "'' for none)")
    parser.add_argument("--json", default="engines_bench.json")
    args = parser.parse_args(argv)
    grid = FULL if args.full else QUICK
    hidden = [int(h) for h in args.hidden.split(",") if h] if args.hidden is not None else grid["hidden"]
    sparsity = [float(s) for s in args.sparsity.split(",")] if args.sparsity else grid["sparsity"]
    threads = [int(t) for t in args.threads.split(",")]
    nets = list(CONV_NETS) if args.conv is None else [n for n in CONV_NETS if n.split()[0] in args.conv.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgeprune-engines-") as scratch:
        print(MLP_HEADER, flush=True)
        rows = mlp_rows(hidden, sparsity, threads, args.rounds, args.calls, Path(scratch)) if hidden else []
        print("\n" + CONV_HEADER, flush=True)
        convs = conv_rows(nets, threads, args.rounds, args.calls, Path(scratch))
        load = None if args.no_load else load_times(Path(scratch), args.load_tries)
    if load:
        print("\n| mobilenet_v2 224² load | seconds | × onnxruntime |\n|---|---:|---:|")
        for name, seconds in load["seconds"].items():
            print(f"| {name} | {seconds:.3f} | {load['ratio'][name]:.2f}× |")
        print(f"auto runs it in: {load['engine']}" + (f" ({load['skipped']['native']})" if load["skipped"] else ""))
    Path(args.json).write_text(json.dumps({"mlp": rows, "conv": convs, "load": load}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
