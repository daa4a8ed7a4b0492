"""``edge_runtime.InferenceSession``: onnxruntime's API over a MODEL_DIR, with sparse kernels.

    sess = InferenceSession("MODEL_DIR", kernels="auto", threads=4)
    y, = sess.run(None, {sess.get_inputs()[0].name: x})

It is a drop-in for ``onnxruntime.InferenceSession`` on a plain ONNX file or its bytes:
``InferenceSession("model.onnx", sess_options, providers=["CPUExecutionProvider"])`` works unchanged.
``sess_options`` gives the threads (its ``intra_op_num_threads``, unless ``threads`` is given; its other
settings are not read). ``providers``: the runtime computes on the CPU only; any other provider named
is ignored with a warning, as a CPU build of onnxruntime ignores the providers it does not have (a
script written for ``CUDAExecutionProvider`` still runs, on the CPU); ``provider_options`` are not read.
``get_providers()``, ``get_modelmeta()``, ``get_inputs()``, ``get_outputs()`` and ``run()`` answer as
onnxruntime's do (``run_options`` is accepted and not read).

``kernels``: "auto" (measure once per device, cached), "sparse", "dense", "ort" (stock
onnxruntime on model.onnx, the baseline), "ort-int8" (onnxruntime on the int8 variant, see
variants.py), or "split" (a conv stem in onnxruntime, the matrix layers after it native: see
partition.py); "auto" measures every engine the MODEL_DIR holds, except a native program that the
cost model (cost.py) shows cannot beat onnxruntime. ``threads`` sets onnxruntime's
intra-op threads and the CSR row-block thread pool; numpy's BLAS reads OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS when numpy is first imported (the ``edge-runtime`` CLI sets them from ``--threads``).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from edge_runtime import cost, onnx_file, partition
from edge_runtime import plan as plans
from edge_runtime import variants
from edge_runtime.allocation import check_graph
from edge_runtime.device import check_threads
from edge_runtime.errors import EdgeRuntimeError, InputError, ModelDirError, UnsupportedOpError
from edge_runtime.graph import Program, check_supported, compile_graph
from edge_runtime.model_dir import FolderFiles, Weights, read_manifest
from edge_runtime.model_format import FORMAT_VERSION_COMPACT, ONNX_FILE, max_model_bytes
from edge_runtime.onnx_check import check_model
from edge_runtime.ops import OPS
from edge_runtime.ops.base import DEFAULT_OPSET
from edge_runtime.ort_session import open_ort
from edge_runtime.partition import SplitProgram

KERNEL_CHOICES = ("auto", "sparse", "dense", "ort", *variants.ENGINES, "split")
SPLIT = "split"  # per-part engines (partition.py): the conv stem in onnxruntime, the sparse head native
SPLIT_SERIAL = "split-serial"  # a tuner candidate only: the split with its head on one-thread kernels
SERIAL_KIND = {"sparse-mt": "sparse"}  # what a thread-pool kernel becomes in SPLIT_SERIAL
# What numpy raises when a graph's attributes or shapes are nonsense (a hostile or broken model): the
# user sees one line naming the model, not a traceback. InputError (a ValueError) is re-raised first.
MODEL_FAILURES = (ValueError, TypeError, IndexError, KeyError, ArithmeticError, AttributeError)


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def check_input_size(shape: Sequence[int], itemsize: int = 4) -> None:
    """Refuse an input shape (from a manifest, or --batch) too big to allocate: checked before numpy tries."""
    nbytes = int(np.prod([int(d) for d in shape], dtype=object)) * itemsize
    if nbytes > max_model_bytes():
        raise InputError(f"an input of shape {list(shape)} would take {nbytes:,} bytes, more than "
                         f"{max_model_bytes():,} (EDGEPRUNE_MAX_MODEL_BYTES)")


class NodeArg(NamedTuple):
    """An input or output's name, shape (``"batch"`` for the free axis) and type, as onnxruntime says."""

    name: str
    shape: List[Any]
    type: str


class ModelMetadata(NamedTuple):
    """What ``onnxruntime.InferenceSession.get_modelmeta()`` reports, read from the model's ONNX file."""

    producer_name: str
    graph_name: str
    domain: str
    description: str
    graph_description: str
    version: int
    custom_metadata_map: Dict[str, str]


CPU_PROVIDER = "CPUExecutionProvider"
_NUMPY_DTYPE = {"float": "float32", "double": "float64"}  # onnxruntime's type names -> numpy's
_MISSING = object()


def _provider_names(providers: Optional[Sequence[Any]]) -> List[str]:
    """The names in an onnxruntime ``providers`` list (names or ``(name, options)`` pairs)."""
    if providers is None:
        return []
    if isinstance(providers, (str, bytes)) or not all(
            isinstance(p, str) or (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)) for p in providers):
        raise EdgeRuntimeError(f"providers must be a list of provider names, got {providers!r}")
    return [p if isinstance(p, str) else p[0] for p in providers]


def check_providers(providers: Optional[Sequence[Any]]) -> None:
    """Accept what a CPU build of onnxruntime accepts: a list of provider names (or ``(name, options)``
    pairs); any but CPUExecutionProvider is ignored with a warning, and the model runs on the CPU."""
    others = [name for name in _provider_names(providers) if name != CPU_PROVIDER]
    if others:
        warnings.warn(f"edge_runtime computes on the CPU only: ignoring providers {others} "
                      f"(running on {CPU_PROVIDER})", stacklevel=3)


def threads_of(sess_options: Any) -> Optional[int]:
    """``sess_options.intra_op_num_threads`` (an onnxruntime.SessionOptions), None for its default 0."""
    if sess_options is None:
        return None
    count = getattr(sess_options, "intra_op_num_threads", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise EdgeRuntimeError(f"sess_options must be an onnxruntime.SessionOptions, got {type(sess_options).__name__}")
    return count or None


def _shape(dims: Sequence[Any]) -> List[Any]:
    """A declared shape as onnxruntime's NodeArg says it: None for an axis with neither size nor name."""
    return [None if d == "?" else d for d in dims]


def _onnx_type(dtype: str) -> str:
    """``tensor(float)`` / ``tensor(int64)``: the type string onnxruntime's NodeArg reports."""
    names = {"float32": "float", "float64": "double"}
    return f"tensor({names.get(dtype, dtype)})"


def collection_paused(load):
    """Run ``load`` with Python's cyclic garbage collector paused (and restored after, if it was on).

    A load makes tens of thousands of small objects (the manifest's JSON, model.onnx's decoded nodes),
    freed by reference counting or kept: the collections their count triggers find no cycles, yet each
    walks every object the process holds. Measured on the mobilenet_v2-shaped load, about a fifth of
    the cached load's own time. Another thread's load may find it paused already, and leaves it so."""
    @functools.wraps(load)
    def paused(*args: Any, **kwargs: Any) -> Any:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return load(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return paused


class InferenceSession:
    """Load a MODEL_DIR, a plain ONNX file or its bytes, and run it. Raises ModelDirError /
    UnsupportedOpError / InputError (all EdgeRuntimeError)."""

    @collection_paused
    def __init__(self, path_or_bytes: Union[str, os.PathLike, bytes], sess_options: Any = None,
                 providers: Optional[Sequence[Any]] = None, provider_options: Optional[Sequence[Any]] = None, *,
                 kernels: str = "auto", threads: Optional[int] = None, verify: bool = True,
                 retune: bool = False) -> None:
        if kernels not in KERNEL_CHOICES:
            raise EdgeRuntimeError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
        check_threads(threads)
        check_threads(threads_of(sess_options))  # intra_op_num_threads is bounded alike
        check_providers(providers)  # provider_options belong to the providers: nothing to read for the CPU
        from_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
        self.model_dir = None if from_bytes else Path(path_or_bytes)
        self.threads = int(threads or threads_of(sess_options) or os.cpu_count() or 1)
        # a plain .onnx file (see onnx_file.py): its own checks replace the MODEL_DIR's manifest and hashes
        self.plain_onnx = from_bytes or onnx_file.is_onnx_file(self.model_dir)
        files, plain_weights = None, None
        if self.plain_onnx:
            self.manifest, plain_weights = onnx_file.load_onnx_file(path_or_bytes if from_bytes else self.model_dir)
        else:
            self._onnx_path = self.model_dir / "model.onnx"
            self.manifest = read_manifest(self.model_dir)
            files = FolderFiles(self.model_dir, self.manifest, verify)
            if verify:  # each file read and hashed once (the hash in a thread, confirmed before any engine)
                files.verify_all(background=True)
        self.kernels, self._retune = kernels, retune
        self._plan_read: Optional[Tuple[str, Optional[Dict[str, Any]]]] = None
        self.plan: Dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._ort = None
        self._variant_ort = None  # a variant's onnxruntime session timed by _tune, kept if it wins
        self._split_candidate: Optional[SplitProgram] = None  # the split timed by _tune, kept if it wins
        self._serial_candidate: Optional[Tuple[SplitProgram, Dict[str, str]]] = None  # see _serial_split
        self._program: Optional[Program] = None
        try:
            self._weights = self._checked_weights(files, plain_weights)
            try:
                self._load_checked(kernels, retune)
            finally:
                self._weights.close()
        except BaseException:
            self.close()  # a failed load must not leave the thread pool behind
            raise

    # -- loading -----------------------------------------------------------------------------------
    def _checked_weights(self, files: Optional[FolderFiles], plain_weights: Any) -> Any:
        """The weights, once every check before any engine has passed: model.onnx against the manifest
        and weights.npz, the graph's allocations. The files' sha256s, computed meanwhile, are confirmed
        last, and a file that fails its own is the error reported, whatever else failed."""
        try:
            weights = plain_weights if self.plain_onnx else Weights(self.model_dir, self.manifest, files)
            self._weights = weights
            if not self.plain_onnx:  # in a thread, while model.onnx is checked
                weights.decode_sparse_ahead(dense_feeds=self._will_feed_onnxruntime())
            try:
                if not self.plain_onnx:  # before any engine reads a byte
                    model = check_model(self.model_dir, self.manifest, weights)
                    self.manifest["meta"] = {**model.meta, "custom_metadata_map": dict(model.metadata_props)}
                self._check_allocations()  # every engine: a graph that asks for too much is refused first
            except BaseException:
                weights.close()
                raise
            return weights
        finally:
            if files is not None:
                files.confirm()

    def _will_feed_onnxruntime(self) -> bool:
        """Whether onnxruntime fp32 will run this MODEL_DIR, as far as known before it is checked:
        ``kernels="ort"``, or a cached plan that says so (only a hint: what is built is still checked)."""
        if self.kernels == "ort":
            return True
        if self.kernels != "auto" or self._retune:
            return False
        cached = self._cached_plan()[1]
        return isinstance(cached, dict) and cached.get("engine") == "ort"

    def _cached_plan(self) -> Tuple[str, Optional[Dict[str, Any]]]:
        """This load's plan cache key and the plan cached for it (read once per load)."""
        if self._plan_read is None:
            key = plans.plan_key(self.manifest, self.threads)
            self._plan_read = (key, plans.load_cached(self.model_dir, key))
        return self._plan_read

    def _check_allocations(self) -> None:
        """Refuse a graph whose intermediates exceed EDGEPRUNE_MAX_MODEL_BYTES at batch 1 (see allocation.py)."""
        opset = int(self.manifest.get("opset") or DEFAULT_OPSET)
        try:
            check_graph(self.manifest["graph"], self._input_specs(), self._weights, opset, str(self.model_dir), OPS)
        except MODEL_FAILURES as error:  # a graph too malformed to walk: said in one line, as at load
            raise ModelDirError(f"{self.model_dir}: the model cannot be loaded ({_describe(error)})") from None

    def _sparse_kind(self) -> str:
        return "sparse-mt" if self.threads > 1 else "sparse"

    def _load_checked(self, kernels: str, retune: bool) -> None:
        """Load; a model whose (checked, consistent) graph still cannot be built is a ModelDirError."""
        try:
            self._load(kernels, retune)
        except EdgeRuntimeError:
            raise
        except MODEL_FAILURES as error:
            raise ModelDirError(f"{self.where}: the model cannot be loaded ({_describe(error)})") from None

    def _load(self, kernels: str, retune: bool) -> None:
        if kernels == "ort":
            self._ort = self._ort_session()
            self.plan = {"engine": "ort"}
        elif kernels in variants.ENGINES:
            self._ort = variants.open_session(self.model_dir or self.where, self.manifest, kernels, self.threads,
                                              self._weights)
            self.plan = {"engine": kernels}
        elif kernels == SPLIT:
            stored = lambda w: "sparse" if self._weights.is_sparse(w) else "dense"
            self._program = self._split_program(stored)
            if self._program is None:
                raise ModelDirError(f"{self.model_dir}: the model has no place to split into a convolutional "
                                    "part and a matrix part (kernels='split')")
            self.plan = {"engine": SPLIT, "cut": self._program.cut.tensor,
                         "layers": {s.weight: s.kernel_kind for s in self._program.steps if s.weight}}
        elif kernels in ("sparse", "dense"):
            kind = "dense" if kernels == "dense" else self._sparse_kind()
            self._program = compile_graph(self.manifest, self._weights, lambda _: kind, self._pool, self.threads)
            self.plan = {"engine": "native", "layers": {s.weight: kind for s in self._program.steps if s.weight}}
        elif self.plain_onnx:  # tuned at each load: a plain file has no folder to keep a plan cache in
            try:
                self.plan = self._tune()
            except EdgeRuntimeError:
                raise
            except MODEL_FAILURES as error:  # native kernels fail on this file: onnxruntime may still run it
                self._program = None
                self.plan = {"engine": "ort", "layers": {}, "reason": f"native failed: {_describe(error)}"}
            self.plan["cached"] = False
            self._apply_plan()
        else:
            key, cached = self._cached_plan()
            cached = None if retune else cached
            ignored = self._cached_plan_fails(cached) if cached is not None else None
            if cached is not None and ignored is None:
                self.plan["cached"] = True
                return
            self.plan = self._tune()
            if ignored:
                self.plan["ignored_cached_plan"] = ignored
            where = plans.save(self.model_dir, key, {k: v for k, v in self.plan.items() if k != "cached"})
            self.plan.update(cached=False, cache_path=str(where) if where else None)
            self._apply_plan()

    def _cached_plan_fails(self, cached: Dict[str, Any]) -> Optional[str]:
        """Apply a cached plan; None when it loaded, else why not. plans.json is only a cache, and it may
        be stale (another export in the same folder) or planted (it travels with the MODEL_DIR): a plan
        naming a variant the model lacks, or an engine that cannot load it, means retuning, never exit 2.
        The model's own faults are found again by tuning, which raises them."""
        self.plan = cached
        try:
            self._apply_plan()
            return None
        except (EdgeRuntimeError, *MODEL_FAILURES) as error:
            self._program, self._ort, self._variant_ort = None, None, None
            return _describe(error)

    def _apply_plan(self) -> None:
        split, self._split_candidate = self._split_candidate, None  # kept only if the plan runs it
        if self.plan.get("engine") in variants.ENGINES:
            self._program = None
            self._ort = self._variant_ort or variants.open_session(self.model_dir, self.manifest,
                                                                   self.plan["engine"], self.threads, self._weights)
            self._variant_ort = None
            return
        self._variant_ort = None
        if self.plan.get("engine") == "ort":
            self._program = None
            self._ort = self._ort or self._ort_session()
            return
        self._ort = None  # never hold onnxruntime's dense copy of the weights beside our own
        layer_kinds = self.plan.get("layers", {})
        default = lambda w: layer_kinds.get(w) or ("sparse" if self._weights.is_sparse(w) else "dense")
        if self.plan.get("engine") == SPLIT:
            self._program = split if split is not None and split.cut.tensor == self.plan.get("cut") \
                else self._split_program(default)
            if self._program is None or self._program.cut.tensor != self.plan.get("cut"):
                raise ModelDirError(f"{self.model_dir}: the plan's split at {self.plan.get('cut')!r} does not fit")
            return
        if self._program is None or isinstance(self._program, SplitProgram) or any(
                s.kernel_kind != default(s.weight) for s in self._program.steps if s.weight):
            self._program = compile_graph(self.manifest, self._weights, default, self._pool, self.threads)

    def _tune(self) -> Dict[str, Any]:
        """Measure layer kernels, then the native program against onnxruntime (see plan.py)."""
        feed = self._sample_feed()
        sample = feed[self._input_specs()[0]["name"]]
        kinds = ("dense", "sparse", "sparse-mt") if self.threads > 1 else ("dense", "sparse")
        plan: Dict[str, Any] = {"threads": self.threads, "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                # not part of the cache key, but it shapes the dense timings: keep a record
                                "blas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS")}
        try:
            check_supported(self.manifest, self._weights)
            skipped = self._native_cannot_win()
            if skipped:
                plan.update(engine="ort", layers={}, skipped={"native": skipped})
                return self._tune_variants(plan, feed, {})
            stored = lambda w: "sparse" if self._weights.is_sparse(w) else "dense"
            program = compile_graph(self.manifest, self._weights, stored, self._pool, self.threads)
        except UnsupportedOpError as error:
            plan.update(engine="ort", reason=str(error), layers={})
            return self._tune_variants(plan, feed, {})
        self._program = program
        timings = plans.choose_layer_kinds(
            self._bound(feed), lambda layer, kind: layer.make_run(layer.kernels(kind, self._pool, self.threads),
                                                         layer.bias(program.constants)),
            sample, kinds)
        layers = {w: min(t, key=t.get) for w, t in timings.items()}
        self._program = compile_graph(self.manifest, self._weights, lambda w: layers[w], self._pool, self.threads)
        candidates = {"native": self._timed_call(self._program, feed)}
        plan.update(layers=layers, layer_ms=timings, engine="native")
        split = self._split_candidate = self._split_program(lambda w: layers[w])
        if split is not None:
            candidates[SPLIT] = self._timed_call(split, feed)
            plan["cut"] = split.cut.tensor
            candidates.update(self._serial_split(layers, feed))
        try:
            self._ort = self._ort_session()
            candidates["ort"] = self._timed_call(self._ort, feed)
        except ModelDirError as error:  # no onnxruntime here, or it cannot load the model: native only
            plan["reason"] = str(error)
        if "ort" not in candidates:
            plan["native_ms"] = plans.compare(candidates, rounds=plans.ENGINE_ROUNDS, statistic="median",
                                              drop_after=plans.ENGINE_DROP_AFTER)["native"]
            return plan
        return self._tune_variants(plan, feed, candidates)

    def _serial_split(self, layers: Dict[str, str], feed: Dict[str, np.ndarray]) -> Dict[str, Any]:
        """The split with its head's thread-pool kernels on one thread, as one more candidate (or none).

        Each layer's kind was chosen timing that layer alone; in a split, onnxruntime's intra-op threads
        have just run the stem on the same cores and still spin when the head starts, so a pool kernel
        can lose to the one-thread one (measured, 2 threads, conv stem + 98% head: split with sparse-mt
        1.26 ms p50 / 5.7 ms p90, with sparse 0.59 / 0.76 ms). Only timing the whole split tells."""
        serial = {w: SERIAL_KIND.get(kind, kind) for w, kind in layers.items()}
        if serial == layers:
            return {}
        program = self._split_program(lambda w: serial[w])
        if program is None:
            return {}
        self._serial_candidate = (program, serial)
        return {SPLIT_SERIAL: self._timed_call(program, feed)}

    def _split_program(self, choose) -> Optional[SplitProgram]:
        """The model split into an onnxruntime part and a native part (partition.py), or None where it
        has no place to split or onnxruntime cannot load the first part."""
        cut = None if self.plain_onnx else partition.find_cut(self.manifest, self._weights)
        if cut is None:
            return None
        open_prefix = lambda data, feeds: open_ort(self._onnx_path, self.threads, feeds, data=data)
        try:
            program, _ = partition.build(self.manifest, self._weights, cut, choose, self._pool, self.threads,
                                         open_prefix, self._weights.files.read(ONNX_FILE))
        except ModelDirError:  # no onnxruntime, or it refuses the part: the whole-model engines remain
            return None
        return program

    def _native_cannot_win(self) -> Optional[str]:
        """Why the native program need not be timed (cost.py: it cannot beat onnxruntime on this model),
        or None. Only when onnxruntime loads the model: without it, native is all there is."""
        bound = cost.native_gain_bound(self.manifest, self._weights)
        if bound >= cost.WORTH_TIMING:
            return None
        try:
            self._ort = self._ort or self._ort_session()
        except ModelDirError:
            return None
        return f"cost model: at most {bound:.2f}x onnxruntime (MACs vs non-zeros), below {cost.WORTH_TIMING}"

    def _tune_variants(self, plan: Dict[str, Any], feed: Dict[str, np.ndarray],
                       candidates: Dict[str, Any]) -> Dict[str, Any]:
        """Time the engines (native, onnxruntime fp32, each variant the MODEL_DIR holds) and keep one."""
        candidates = dict(candidates)
        if "ort" not in candidates:
            ort_session = self._ort = self._ort or self._ort_session()
            candidates["ort"] = self._timed_call(ort_session, feed)
        for engine in variants.ENGINES:
            if variants.find(self.manifest, engine) is None:
                continue
            try:
                session = variants.open_session(self.model_dir, self.manifest, engine, self.threads, self._weights)
            except ModelDirError as error:  # e.g. an older onnxruntime without its ops: the others still run
                plan[f"{engine}_error"] = str(error)
                continue
            candidates[engine] = self._timed_call(session, feed)
            self._variant_ort = session
        if len(candidates) < 2:
            return plan
        measured = plans.compare(candidates, rounds=plans.ENGINE_ROUNDS, statistic="median",
                                 drop_after=plans.ENGINE_DROP_AFTER)
        whole = {engine: ms for engine, ms in measured.items() if engine not in (SPLIT, SPLIT_SERIAL)}
        plan.update(native_ms=measured.get("native"), ort_ms=measured.get("ort"),
                    engine_ms=measured, **variants.choose(whole, plans.NATIVE_MARGIN))
        splits = {engine: measured[engine] for engine in (SPLIT, SPLIT_SERIAL) if measured.get(engine) is not None}
        best = min(splits, key=splits.get) if splits else None
        if best is not None and splits[best] * plans.NATIVE_MARGIN <= min(whole.values()):
            plan["engine"] = SPLIT  # it beats every whole-model engine by the margin native needs to
            if best == SPLIT_SERIAL:  # the plan's layer kinds are what the split's head runs
                self._split_candidate, plan["layers"] = self._serial_candidate
        elif "cut" in plan:
            del plan["cut"]
        self._serial_candidate = None
        return plan

    def _sample_feed(self) -> Dict[str, np.ndarray]:
        """The manifest's sample inputs; without them, seeded noise (zeros for integer inputs), batch 1."""
        try:
            sample = self._weights.sample_inputs(self.manifest)
        except ModelDirError:  # no sample: tune on seeded noise of the declared shapes, batch 1
            feed = {}
            for spec in self._input_specs():
                shape = [1 if isinstance(d, str) else int(d) for d in spec["shape"]]
                dtype = np.dtype(spec["dtype"])
                check_input_size(shape, dtype.itemsize)
                feed[spec["name"]] = (np.random.default_rng(0).standard_normal(shape).astype(dtype)
                                      if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype))
            return feed
        try:  # the sample comes from the npz: both engines are timed on it, so it must fit the inputs
            return self._check_feed(sample)
        except InputError as error:
            raise ModelDirError(f"{self.where}: the manifest's sample does not fit its inputs ({error})") from None

    def _input_specs(self) -> List[Dict[str, Any]]:
        """Every input (manifest ``inputs``; a format-1 manifest may have only ``input``)."""
        specs = self.manifest.get("inputs")
        return specs if isinstance(specs, list) and specs else [self.manifest["input"]]

    def _bound(self, feed: Dict[str, np.ndarray]) -> Program:
        """The native program with every input but the first bound as a constant of this run."""
        names = [spec["name"] for spec in self._input_specs()]
        if len(names) == 1:
            return self._program
        extra = {name: feed[name] for name in names[1:]}
        return dataclasses.replace(self._program, constants={**self._program.constants, **extra})

    def _ort_session(self):
        """onnxruntime on model.onnx; a compact (format 3) MODEL_DIR's weights are fed from weights.npz.
        A plain file: onnxruntime loads the bytes that were checked, its external data fed as arrays."""
        if self.plain_onnx:
            return open_ort(self._weights.source, self.threads, self._weights.fed(), where=self.where)
        if self.manifest["format_version"] < FORMAT_VERSION_COMPACT:  # formats 1-2: weights read by path
            return open_ort(self._onnx_path, self.threads)
        # the checked bytes of model.onnx (placeholders only), and the weights as arrays viewed in the
        # checked weights.npz where they are stored dense float32: nothing is read or copied twice
        return open_ort(self._onnx_path, self.threads, self._weights.fed(), data=self._weights.files.read(ONNX_FILE))

    # -- onnxruntime-style API -----------------------------------------------------------------------
    @property
    def where(self) -> str:
        """The model as messages name it: its path, or "model bytes"."""
        return str(self.model_dir) if self.model_dir is not None else "model bytes"

    def get_providers(self) -> List[str]:
        """["CPUExecutionProvider"]: every engine (native, onnxruntime, int8) computes on the CPU."""
        return [CPU_PROVIDER]

    def get_modelmeta(self) -> ModelMetadata:
        """The ONNX file's producer, graph name, domain, doc strings, model version and metadata_props."""
        meta = self.manifest.get("meta") or {}
        return ModelMetadata(meta.get("producer_name", ""), meta.get("graph_name", ""), meta.get("domain", ""),
                             meta.get("description", ""), meta.get("graph_description", ""),
                             int(meta.get("version", 0)), dict(meta.get("custom_metadata_map", {})))

    @property
    def engine(self) -> str:
        """"native" (numpy/scipy kernels), "ort" (whole model in onnxruntime), a variant's engine
        ("ort-int8") or "split" (per-part engines)."""
        if isinstance(self._program, SplitProgram):
            return SPLIT
        if self._ort is None or self._program is not None:
            return "native"
        return self.plan["engine"] if self.plan.get("engine") in variants.ENGINES else "ort"

    @property
    def variant(self) -> Dict[str, Any]:
        """``{name, accuracy, size}`` of the variant that runs (fp32 unless an int8 engine was chosen)."""
        return variants.describe(self.manifest, self.engine)

    def get_inputs(self) -> List[NodeArg]:
        """Name, shape (a string for a named free axis, None for an unnamed one) and type of each input."""
        return [NodeArg(spec["name"], _shape(spec["shape"]), _onnx_type(spec["dtype"])) for spec in self._input_specs()]

    def get_outputs(self) -> List[NodeArg]:
        """As get_inputs, for the outputs (no shape inference: [] where the file declares none)."""
        specs = {spec.get("name"): spec for spec in self.manifest.get("output_specs") or [] if isinstance(spec, dict)}
        return [NodeArg(name, _shape(specs.get(name, {}).get("shape", [])),
                        _onnx_type(specs.get(name, {}).get("dtype", "float32"))) for name in self.manifest["outputs"]]

    def _feed_checks(self) -> List[tuple]:
        """Per input, what a call's array must match, worked out once from the manifest: ``(name, numpy
        dtype, rank or None, ((axis, size) of each fixed axis), the declared shape for messages)``.
        A call at batch 1 takes tens of microseconds: checking against prepared figures keeps the
        wrapper's own cost to about a microsecond per input (parsing the specs each call cost ~6 µs)."""
        checks = getattr(self, "_checks", None)
        if checks is None:
            checks = []
            for spec in self._input_specs():
                shape = list(spec["shape"])
                rank_known = spec.get("rank_known") is not False  # a plain ONNX input without a shape: any
                fixed = tuple((axis, int(d)) for axis, d in enumerate(shape) if not isinstance(d, str))
                checks.append((spec["name"], np.dtype(spec["dtype"]), len(shape) if rank_known else None,
                               fixed if rank_known else (), shape))
            self._checks = checks
        return checks

    def _check_feed(self, input_feed: Dict[str, Any]) -> Dict[str, np.ndarray]:
        checks = self._feed_checks()
        if not isinstance(input_feed, dict):
            raise InputError(f"input feed must be a dict with key(s) {', '.join(repr(c[0]) for c in checks)}")
        feed = {}
        for check in checks:  # a plain loop: this runs on every call
            x = input_feed.get(check[0], _MISSING)
            if x is _MISSING:
                raise InputError(f"input feed must be a dict with key(s) {', '.join(repr(c[0]) for c in checks)}")
            feed[check[0]] = self._check_input(check, x)
        if len(input_feed) != len(checks):
            extra = set(input_feed) - set(feed)
            raise InputError(f"unknown input(s): {', '.join(sorted(map(str, extra)))}")
        return feed

    @staticmethod
    def _check_input(check: tuple, x: Any) -> np.ndarray:
        name, dtype, rank, fixed, shape = check
        if not isinstance(x, np.ndarray):
            raise InputError(f"input {name!r} must be a numpy array, got {type(x).__name__}")
        if x.dtype != dtype:
            raise InputError(f"input {name!r} has dtype {x.dtype}, expected {dtype}")
        if rank is not None and (x.ndim != rank or any(x.shape[axis] != size for axis, size in fixed)):
            raise InputError(f"input {name!r} has shape {list(x.shape)}, expected {shape}")
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)

    def _output_dtypes(self) -> Dict[str, np.dtype]:
        """Each output's numpy dtype (what the native engine's arrays are cast to), worked out once."""
        dtypes = getattr(self, "_dtypes", None)
        if dtypes is None:
            dtypes = self._dtypes = {arg.name: np.dtype(_NUMPY_DTYPE.get(t, t)) for arg in self.get_outputs()
                                     for t in [arg.type[len("tensor("):-1]]}
        return dtypes

    def run(self, output_names: Optional[Sequence[str]], input_feed: Dict[str, Any],
            run_options: Any = None) -> List[np.ndarray]:
        """Run the model; returns the requested outputs (all of them when ``output_names`` is None).
        ``run_options`` (onnxruntime.RunOptions) is accepted for onnxruntime's signature and not read."""
        outputs = self.manifest["outputs"]
        names = list(output_names) if output_names else list(outputs)
        unknown = [n for n in names if n not in outputs] if output_names else None
        if unknown:
            raise InputError(f"unknown output(s): {', '.join(unknown)}")
        feed = self._check_feed(input_feed)
        if self._program is None:
            return self._run_ort(self._ort, names, feed)
        return self._run_native(self._program, names, feed)

    def _run_ort(self, session: Any, names: List[str], feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """``names`` from an onnxruntime session on a checked feed: what ``run`` does, and what the tuner
        times (so an engine's figure includes exactly the cost a call pays)."""
        try:
            # onnxruntime's compiled session, past its Python wrapper's checks of the feed (ours just ran
            # them): at batch 1 a call takes tens of microseconds and those checks cost a few
            return getattr(session, "_sess", session).run(names, feed, None)
        except Exception as error:  # onnxruntime's errors are untyped; the model was checked at load
            raise ModelDirError(f"onnxruntime failed to run {self.where}: {_describe(error)}") from None

    def _run_native(self, program: Any, names: List[str], feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """``names`` from the native (or split) program on a checked feed, as ``run`` returns them."""
        try:
            results = dict(zip(program.output_names, program.run(feed)))
        except EdgeRuntimeError:  # said on purpose (InputError is also a ValueError): keep its own type
            raise
        except MODEL_FAILURES as error:
            if any(value.size == 0 for value in feed.values()):  # onnxruntime answers; numpy may not
                raise InputError(f"an empty input (batch 0): the native engine cannot run this model on it "
                                 f"({_describe(error)}); try kernels='ort'") from None
            raise ModelDirError(f"{self.where}: the model failed while running ({_describe(error)})") from None
        dtypes = self._output_dtypes()
        return [np.asarray(results[n], dtype=dtypes[n]) for n in names]

    def _timed_call(self, engine: Any, feed: Dict[str, np.ndarray]) -> Any:
        """A candidate for the tuner: ``engine`` (an onnxruntime session, or a native/split program) called
        the way ``run`` calls it, feed check and output handling included. Timing the bare engines
        favoured native by onnxruntime's Python wrapper (~5 µs a call), which at batch 1 on a 98%-sparse
        MLP (50-80 µs a call) was enough to keep native where the int8 variant was faster."""
        names = list(self.manifest["outputs"])
        if hasattr(engine, "output_names"):
            return lambda: self._run_native(engine, names, self._check_feed(feed))
        return lambda: self._run_ort(engine, names, self._check_feed(feed))

    def close(self) -> None:
        """Stop the thread pool (also done when the session is garbage collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
