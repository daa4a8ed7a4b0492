"""Where a cached ``edge_runtime.InferenceSession`` load spends its time, beside onnxruntime's own (issue 19).

    python3 benchmarks/studies/load_phases.py [--tries 20] [--json load_phases.json]

Builds the mobilenet_v2-shaped net of ``engines.py``'s load table (3×224×224, 50% pruned, exported as a
MODEL_DIR and as one plain ONNX file), then loads it, taking turns, ``--tries`` times each way:
onnxruntime creating a session from the plain file (the baseline; same options as the runtime's: one
intra-op and one inter-op thread, default graph optimizations), and ``InferenceSession(kernels="auto",
threads=1)`` with its plan cached. Each phase of the cached load is timed in the loading thread (wall
and that thread's CPU; the fastest try of each): what remains besides onnxruntime's own session is
what the load checks. The sha256s and the CSR decoding run in threads beside it (``model_dir.py``),
so on a busy machine the wall time exceeds the loading thread's CPU. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

# (label, module, attribute): the phases of a cached load, in the order they run
PHASES = [("manifest.json read and checked", "edge_runtime.session", "read_manifest"),
          ("files read (hashed in a thread)", "edge_runtime.model_dir", "FolderFiles.verify_all"),
          ("weights.npz directory and headers", "edge_runtime.model_dir", "NpzArchive"),
          ("model.onnx decoded", "edge_runtime.onnx_wire", "parse_model"),
          ("stored arrays checked (CSR decoded in a thread)", "edge_runtime.model_dir", "Weights.check_all"),
          ("initializers vs weights.npz", "edge_runtime.onnx_check", "_check_initializers"),
          ("graph vs manifest", "edge_runtime.onnx_check", "_check_graph"),
          ("allocation walk", "edge_runtime.session", "InferenceSession._check_allocations"),
          ("sha256s confirmed (waiting)", "edge_runtime.model_dir", "FolderFiles.confirm"),
          ("plan cache read", "edge_runtime.plan", "load_cached"),
          ("weights made dense for onnxruntime", "edge_runtime.model_dir", "Weights.fed"),
          ("onnxruntime session created", "edge_runtime.session", "open_ort"),
          ("whole load", "edge_runtime.session", "InferenceSession.__init__")]


def build(root: Path) -> Dict[str, Path]:
    """The mobilenet_v2-shaped net, 50% pruned by global magnitude, as a MODEL_DIR and a plain file."""
    import torch
    from torch import nn

    from benchmarks.studies.depthwise_runtime import mobilenet_like
    from compressor.export.model_dir import export_model
    from edge_runtime.onnx_embed import model_dir_to_onnx

    model = mobilenet_like(224)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    threshold = torch.cat([w.detach().abs().flatten() for w in weights]).quantile(0.5)
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    folder = root / "mobilenet_v2-224"
    export_model(model, folder, force=True, source={"model": "mobilenet_v2-224", "benchmark": True})
    plain = root / "mobilenet_v2-224.onnx"
    plain.write_bytes(model_dir_to_onnx(folder))
    return {"dir": folder, "onnx": plain}


def instrument(spent: Dict[str, List[float]]) -> None:
    """Wrap each phase's function so that its wall and thread CPU time add up in ``spent`` per load."""
    import importlib

    for label, module_name, attribute in PHASES:
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def timed(*args: Any, __original: Callable = original, __label: str = label, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return __original(*args, **kwargs)
            finally:
                spent.setdefault(__label, [0.0, 0.0])
                spent[__label][0] += time.perf_counter() - wall
                spent[__label][1] += time.thread_time() - cpu
        setattr(owner, name, functools.wraps(original)(timed))


def ort_session(path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(pair: Dict[str, Path], tries: int) -> Dict[str, Dict[str, float]]:
    """Fastest wall and thread-CPU milliseconds of each phase, and of onnxruntime's session."""
    from edge_runtime import InferenceSession

    spent: Dict[str, List[float]] = {}
    instrument(spent)
    InferenceSession(pair["dir"], kernels="auto", threads=1)  # tunes once: every try below is a cached load
    best: Dict[str, List[float]] = {}
    for _ in range(tries):
        wall, cpu = time.perf_counter(), time.thread_time()
        ort_session(pair["onnx"])
        baseline = [time.perf_counter() - wall, time.thread_time() - cpu]
        spent.clear()
        InferenceSession(pair["dir"], kernels="auto", threads=1)
        for label, figures in [("onnxruntime alone, plain file (baseline)", baseline), *spent.items()]:
            best[label] = [min(a, b) for a, b in zip(best.get(label, figures), figures)]
    return {label: {"wall_ms": 1000 * w, "cpu_ms": 1000 * c} for label, (w, c) in best.items()}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--json", default="load_phases.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeprune-load-") as scratch:
        figures = measure(build(Path(scratch)), args.tries)
    base = figures["onnxruntime alone, plain file (baseline)"]
    print("| phase (fastest of each) | wall ms | loading thread CPU ms | CPU × baseline |\n|---|---:|---:|---:|")
    for label, ms in figures.items():
        print(f"| {label} | {ms['wall_ms']:.2f} | {ms['cpu_ms']:.2f} | {ms['cpu_ms'] / base['cpu_ms']:.2f}× |")
    Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
