"""``edge-runtime bench``: one configuration, measured the way onnxruntime_perf_test and TFLite's
benchmark_model do it (load time, first run, warm-up, then timed runs until both ``iters`` and
``min_seconds`` are reached), reported as a JSON-ready dict."""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from edge_runtime.device import cpu_model
from edge_runtime.model_format import shipped_bytes


def _input_layout(spec: Any, batch: int) -> Tuple[List[int], np.dtype]:
    """The shape (free axis, named or None = ``batch``) and numpy dtype of one input, as the session
    declares it."""
    shape = [batch if d is None or isinstance(d, str) else int(d) for d in spec.shape]
    dtype = spec.type[len("tensor("):-1]
    return shape, np.dtype({"float": "float32", "double": "float64"}.get(dtype, dtype))


def random_feed(specs: Sequence[Any], batch: int, seed: int) -> Dict[str, np.ndarray]:
    """Every input: seeded noise for a float one, zeros (valid token ids / mask values) for an integer one.

    The manifest declares the shapes and --batch scales them: their bytes together are checked against
    EDGEPRUNE_MAX_MODEL_BYTES before numpy allocates anything."""
    from edge_runtime.errors import InputError
    from edge_runtime.model_format import max_model_bytes
    from edge_runtime.session import check_input_size

    layouts = {spec.name: _input_layout(spec, batch) for spec in specs}
    for shape, dtype in layouts.values():
        check_input_size(shape, dtype.itemsize)
    total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layouts.values())
    if total > max_model_bytes():
        raise InputError(f"the {len(layouts)} inputs of batch {batch} would take {total:,} bytes, more than "
                         f"{max_model_bytes():,} (EDGEPRUNE_MAX_MODEL_BYTES)")
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
            else np.zeros(shape, dtype) for name, (shape, dtype) in layouts.items()}


def latency_stats(samples_ms: List[float]) -> Dict[str, float]:
    """mean/std/min/percentiles/max of per-run latencies in milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    stats = {"mean": values.mean(), "std": values.std(), "min": values.min()}
    for p in (50, 90, 95, 99):
        stats[f"p{p}"] = np.percentile(values, p)
    stats["max"] = values.max()
    return {key: round(float(value), 4) for key, value in stats.items()}


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    Linux: VmHWM from /proc/self/status, which starts afresh at exec; ru_maxrss does not (a process
    started by a big parent inherits the parent's peak). Elsewhere ru_maxrss (KiB; bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 2)
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 2)


def device_info() -> Dict[str, Any]:
    import os

    import scipy

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"machine": platform.machine(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "onnxruntime": ort_version, "hostname": platform.node()}


def benchmark(model_dir: Path, kernels: str, threads: int, warmup: int, iters: int, min_seconds: float,
              batch: int = 1, seed: int = 0) -> Dict[str, Any]:
    """Load MODEL_DIR with these settings, run it, and return the report dict."""
    from edge_runtime.session import InferenceSession

    start = time.perf_counter()
    session = InferenceSession(model_dir, kernels=kernels, threads=threads)
    load_s = time.perf_counter() - start
    feed = random_feed(session.get_inputs(), batch, seed)
    start = time.perf_counter()
    session.run(None, feed)
    first_ms = 1e3 * (time.perf_counter() - start)
    for _ in range(warmup):
        session.run(None, feed)
    samples: List[float] = []
    began = time.perf_counter()
    while len(samples) < iters or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(1e3 * (time.perf_counter() - start))
    timed_s = time.perf_counter() - began
    stats = latency_stats(samples)
    manifest = session.manifest
    report = {
        "load_s": round(load_s, 4), "first_ms": round(first_ms, 4), "latency_ms": stats,
        # runs per second of running, as onnxruntime_perf_test and benchmark_model report it: every timed
        # run over the wall time they took together (p50 stays beside it for the typical call)
        "throughput_per_s": round(len(samples) * batch / timed_s, 3) if timed_s > 0 else None,
        "timed_s": round(timed_s, 6),  # the timed runs together, wall time
        "peak_rss_mb": peak_rss_mb(), "iterations": len(samples), "batch": batch,
        "kernels": kernels, "engine": session.engine, "threads": session.threads,
        "variant": session.variant,  # which model ran (fp32 / int8) and its accuracy
        "plan": {k: v for k, v in session.plan.items()
                 if k in ("engine", "layers", "native_ms", "ort_ms", "engine_ms", "cached")},
        "model": {"path": str(Path(model_dir).resolve()), "sparsity": manifest.get("sparsity"),
                  "size_bytes": shipped_bytes(Path(model_dir), manifest)},
        "device": device_info(),
    }
    session.close()
    return report
