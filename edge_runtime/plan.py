"""``kernels="auto"``: measure each layer's kernels on this device, keep the fastest, cache the plan.

The plan has two levels. Per weight layer: dense (BLAS), sparse (CSR) or sparse-mt (CSR row blocks in
threads), whichever ran the layer's real input fastest (median call). Then the whole native program is timed against
stock onnxruntime on the same model.onnx (and the MODEL_DIR's variants, e.g. int8), and the engine whose
median call is fastest wins -- the p50 latency users measure: that is what keeps ``auto`` from ever
being slower than onnxruntime (small CNNs at batch 1, dense models). Plans are cached beside the
model (``plans.json``), or in ``~/.cache/edge-runtime`` when MODEL_DIR is read-only, keyed by the
device fingerprint, the thread count, the model's file hashes and how the engines were compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from edge_runtime.device import fingerprint
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kernels import KINDS
from edge_runtime.variants import ENGINES as VARIANT_ENGINES
from edge_runtime.model_format import PLANS_FILE as PLAN_FILE
from edge_runtime.safe_io import atomic_write_text, read_bounded

MAX_PLANS_BYTES = 16 << 20
ROUND_SECONDS = 0.02   # each timing round runs a candidate for at least this long (and twice) ...
ROUNDS = 5             # ... candidates take turns round by round, and each one's fastest round counts,
                       # so a burst of other work on the device hits every candidate alike
ENGINE_ROUNDS = 9      # native vs onnxruntime decides the whole model: more rounds, median call
NATIVE_MARGIN = 1.05   # native must beat onnxruntime by 5% to be chosen: onnxruntime is the stock
                       # baseline, so a near-tie goes to it and `auto` is never slower beyond noise
CANNOT_WIN = 2.0       # a candidate whose fastest round is this many times the leader's slowest round
                       # stops being timed: noise between rounds is tens of percent, never 2×
ENGINE_DROP_AFTER = 3  # ... but an engine is judged so only after this many rounds: on a busy device one
                       # round can be 5× slow (a burst of other work), and an engine dropped on it kept that
                       # figure (measured: int8 timed at 10 ms for its 1.8 ms call, and native chosen)
TUNER = "engine-p50-as-run"  # in the cache key: plans chosen by an earlier statistic (round means) or by
                               # timing bare engines (without what run() adds to each call) are retuned


def _round(fn: Callable[[], Any], round_seconds: float) -> list:
    """Seconds of each call of one round: ``fn`` runs for at least ``round_seconds``, and twice."""
    times, start = [], time.perf_counter()
    last = start
    while True:
        fn()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if now - start >= round_seconds and len(times) >= 2:
            return times


def _median(values: list) -> float:
    return sorted(values)[len(values) // 2]


def compare(candidates: Dict[str, Callable[[], Any]], rounds: int = ROUNDS,
            round_seconds: float = ROUND_SECONDS, statistic: str = "min",
            give_up: Optional[float] = CANNOT_WIN, drop_after: int = 1) -> Dict[str, float]:
    """Milliseconds per call of each candidate, from interleaved rounds (after a warm-up).

    ``min``: each candidate's best round mean -- a kernel's own speed.
    ``median``: the median of every call of every round -- the p50 latency that users measure, for
    the per-layer kernels and the whole model's engine. A mean (of a round, or the median of round
    means) follows the tail: multi-threaded onnxruntime on a busy device has rare calls many times the typical one, and
    those made ``auto`` keep an engine whose typical call was slower (issue 12's 2-thread rows).

    A candidate that cannot win (see ``still_in``) is timed no further; its figure comes from the rounds
    it ran. This is what keeps tuning a model whose native program is far slower than onnxruntime short.
    Rounds are judged by the same statistic: their mean for ``min``, their median call for ``median``;
    no candidate is dropped before ``drop_after`` rounds (ENGINE_DROP_AFTER for the whole-model choice).
    """
    if statistic not in ("min", "median"):
        raise ValueError(f"statistic must be 'min' or 'median', got {statistic!r}")
    for fn in candidates.values():
        fn()
    per_round: Dict[str, list] = {name: [] for name in candidates}
    calls: Dict[str, list] = {name: [] for name in candidates}
    summary = (lambda times: sum(times) / len(times)) if statistic == "min" else _median
    active = list(candidates)
    for done in range(1, rounds + 1):
        for name in active:
            times = [1e3 * t for t in _round(candidates[name], round_seconds)]
            per_round[name].append(summary(times))
            calls[name].extend(times)
        if done >= drop_after:
            active = still_in(per_round, active, give_up)
        if len(active) == 1:
            break
    if statistic == "min":
        return {name: min(times) for name, times in per_round.items()}
    return {name: _median(times) for name, times in calls.items()}


def still_in(per_round: Dict[str, list], active: list, give_up: Optional[float]) -> list:
    """The candidates that can still win: those whose fastest round is within ``give_up`` times the
    slowest round of the leader (the candidate with the best worst round). The leader always stays."""
    if give_up is None or len(active) < 2:
        return active
    leader_worst = min(max(per_round[name]) for name in active)
    return [name for name in active if min(per_round[name]) <= give_up * leader_worst]


def plan_key(manifest: Dict[str, Any], threads: int) -> str:
    """The cache key: this device, this thread count, this exact model, this way of choosing."""
    text = json.dumps({"device": fingerprint(), "threads": threads, "files": manifest["files"], "tuner": TUNER},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_paths(model_dir: Path):
    return [Path(model_dir) / PLAN_FILE, Path.home() / ".cache" / "edge-runtime" / PLAN_FILE]


def read_plans(path: Path) -> Dict[str, Any]:
    """The plans in one cache file, or {} when there is none or it is no plan cache.

    The one reader of plans.json (loading and saving alike): it sits in a MODEL_DIR that may come from
    elsewhere, so only a regular file of at most MAX_PLANS_BYTES is read -- a FIFO, a link to
    /dev/zero or a 4 GiB file is no cache, never a hang or a huge read.
    """
    try:
        plans = json.loads(read_bounded(path, MAX_PLANS_BYTES))
    except (EdgeRuntimeError, OSError, ValueError, RecursionError):
        return {}
    return plans if isinstance(plans, dict) else {}


def load_cached(model_dir: Path, key: str) -> Optional[Dict[str, Any]]:
    """A cached plan for ``key``, or None (a corrupt cache file is ignored: it is only a cache)."""
    for path in _cache_paths(model_dir):
        plans = read_plans(path)
        if _is_plan(plans.get(key)):
            return plans[key]
    return None


def _is_plan(plan: Any) -> bool:
    """A cached plan names an engine and a known kernel kind per layer (anything else is ignored)."""
    layers = plan.get("layers", {}) if isinstance(plan, dict) else None
    if isinstance(plan, dict) and plan.get("engine") == "split" and not isinstance(plan.get("cut"), str):
        return False  # per-part engines (partition.py) name the tensor where the model is cut
    return (isinstance(plan, dict) and plan.get("engine") in ("native", "ort", "split", *VARIANT_ENGINES)
            and isinstance(layers, dict)
            and all(isinstance(k, str) and v in KINDS for k, v in layers.items()))


def save(model_dir: Path, key: str, plan: Dict[str, Any]) -> Optional[Path]:
    """Store the plan in the first writable cache location; returns where, or None.

    Written through ``safe_io.atomic_write_text`` (an exclusive, no-follow temp file renamed over a
    plans.json that is not a link), so a MODEL_DIR with links planted at temp names or at plans.json
    itself cannot make the runtime write outside it; a failed write leaves no temp file behind.
    """
    for path in _cache_paths(model_dir):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            plans = read_plans(path)
            plans[key] = plan
            atomic_write_text(path, json.dumps(plans, indent=1) + "\n")
            return path
        except OSError:
            continue
    return None


def choose_layer_kinds(program: Any, make_kernels: Callable[[Any, str], Any], sample: Any,
                       kinds: tuple) -> Dict[str, Dict[str, float]]:
    """Time the kinds that can win on each weight layer's recorded input; returns {weight: {kind: ms}}
    (a kind left out could not win).

    sparse-mt runs the sparse kernel's row blocks on at most one thread per core, so it is never faster
    than sparse divided by the core count: it is only built and timed when that bound beats the best
    single-thread kind. Within a layer, ``compare`` drops a kind as soon as it falls 2× behind.
    """
    recorded: Dict[str, list] = {}
    program.run(sample, record=recorded)
    cores = os.cpu_count() or 1
    timings: Dict[str, Dict[str, float]] = {}
    for step in program.steps:
        if step.weight is None:
            continue
        layer, args = program.layers[step.name], recorded[step.name]
        timed = _time_kinds(layer, args, make_kernels, [k for k in kinds if k != "sparse-mt"])
        if "sparse-mt" in kinds and "sparse" in timed and timed["sparse"] / cores < min(timed.values()):
            timed.update(_time_kinds(layer, args, make_kernels, ["sparse-mt"]))
        timings[step.weight] = timed
    return timings


def _time_kinds(layer: Any, args: list, make_kernels: Callable[[Any, str], Any], kinds: list) -> Dict[str, float]:
    runs = {kind: make_kernels(layer, kind) for kind in kinds}
    # the median call, not the best round: on a busy device the thread-pool kernel (sparse-mt) has good
    # rounds and a typical call many times slower (measured: a split kept sparse-mt and ran 13 ms a call
    # where the same split with sparse ran 0.75 ms)
    return compare({kind: (lambda run=run: run(args)) for kind, run in runs.items()}, rounds=3, round_seconds=0.005,
                   statistic="median")
