"""``edge-runtime``: the device-side command (run, check, info, tune, bench).

Arguments are parsed before numpy is imported, so ``--threads N`` can still set numpy's BLAS threads
(OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS, unless already set in the environment).
User errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from edge_runtime import __version__
from edge_runtime import onnx_file
from edge_runtime.device import check_threads
from edge_runtime.errors import EdgeRuntimeError, InputError, ModelDirError
from edge_runtime.wording import counted

# OSError: a MODEL_DIR file that vanished or cannot be read (e.g. `info` on an incomplete copy).
USER_ERRORS = (EdgeRuntimeError, OSError)
PLAIN_CHECK_TOLERANCE = 1e-4  # native vs onnxruntime, relative to the output's magnitude
BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description="Run an edgeprune MODEL_DIR (or any plain "
                                                                      ".onnx file) on this device.")
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, kernels: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("model_dir", type=Path, metavar="MODEL_DIR|MODEL.onnx")
        sub.add_argument("--threads", type=int, help="threads for kernels and onnxruntime (default: all cores)")
        if kernels:
            sub.add_argument("--kernels", choices=("auto", "sparse", "dense", "ort", "ort-int8", "split"), default="auto",
                             help="auto: measured per device (cached); ort: stock onnxruntime on model.onnx; "
                                  "ort-int8: onnxruntime on the int8 variant (export --quantize int8); "
                                  "split: a conv stem in onnxruntime, the matrix layers after it native")
        return sub

    run = command("run", "run the model on input arrays and print or save the outputs")
    run.add_argument("--input", action="append", required=True, metavar="[NAME=]FILE",
                     help="an input array (.npy, the model's dtype); NAME=FILE once per input when the model "
                          "has several, or one .npz holding every input by name")
    run.add_argument("--output", type=Path, help="write the first output here (.npy)")
    run.add_argument("--out", type=Path, help="write every output here (.npz, by output name)")
    run.add_argument("--print", action="store_true", help="print every output's values")
    command("check", "verify sha256s and run the manifest's sample; exit 0 when the output matches")
    command("info", "layers, shapes, sparsity, sizes and the cached plan", kernels=False)
    tune = command("tune", "measure kernels on this device and cache the plan", kernels=False)
    tune.add_argument("--json", action="store_true", help="print the plan as JSON")
    to_onnx = command("to-onnx", "write the MODEL_DIR as one plain ONNX file that stock onnxruntime loads",
                      kernels=False)
    to_onnx.add_argument("out", type=Path, metavar="OUT.onnx", help="the file to write")
    to_onnx.add_argument("--variant", default="fp32", choices=("fp32", "int8"),
                         help="fp32 (default: model.onnx) or the int8 variant (export --quantize int8)")
    to_onnx.add_argument("--force", action="store_true", help="replace an existing OUT.onnx")
    bench = command("bench", "measure load time, latency, throughput and peak memory")
    bench.add_argument("--warmup", type=int, default=5, help="untimed runs after the first (default 5)")
    bench.add_argument("--iters", type=int, default=50, help="at least this many timed runs (default 50)")
    bench.add_argument("--min-seconds", type=float, default=1.0, help="and at least this long (default 1)")
    bench.add_argument("--batch", type=int, default=1, help="batch size of the random input (default 1)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, set thread env, dispatch; user errors → one line + exit 2."""
    args = _parser().parse_args(argv)
    # A model's arithmetic may overflow (inf/nan weights in a hostile or broken file): the command's
    # one line says what that did to the output; numpy's per-line RuntimeWarnings would only add noise.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    if args.threads is not None:
        try:
            check_threads(args.threads)
        except EdgeRuntimeError as error:
            print(f"edge-runtime {args.command}: error: --{error}", file=sys.stderr)
            return 2
        for name in BLAS_ENV:  # read by the BLAS when numpy loads, which has not happened yet
            os.environ.setdefault(name, str(args.threads))
    if args.command == "bench":
        problem = _bench_arguments_problem(args)
        if problem:
            print(f"edge-runtime bench: error: {problem}", file=sys.stderr)
            return 2
    try:
        return {"run": _run, "check": _check, "info": _info, "tune": _tune, "bench": _bench,
                "to-onnx": _to_onnx}[args.command](args)
    except BrokenPipeError:
        # `edge-runtime info DIR | head -1`: the reader left; end quietly, as a SIGPIPE'd tool would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except USER_ERRORS as error:
        print(f"edge-runtime {args.command}: error: {error}", file=sys.stderr)
        return 2
    except MemoryError:  # a model or input too big for this device: say so in one line
        print(f"edge-runtime {args.command}: error: out of memory loading or running {args.model_dir}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def human_bytes(count: float) -> str:
    """1,234,567 → "1.18 MiB": sizes as people read them."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def _bench_arguments_problem(args: argparse.Namespace) -> Optional[str]:
    """Why the bench counts cannot work (no timed run at all, an empty batch), or None."""
    if args.iters < 1:
        return f"--iters must be at least 1, got {args.iters}"
    if args.warmup < 0 or not args.min_seconds >= 0:
        return "--warmup and --min-seconds must not be negative"
    if args.batch < 1:
        return f"--batch must be at least 1, got {args.batch}"
    return None


def _load_array(path: Path) -> Any:
    """One .npy array, or a .npz's arrays by name; never pickles."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"cannot read {path} as a .npy/.npz array ({error})") from None


def _input_feed(values: Sequence[str], names: Sequence[str]) -> Dict[str, Any]:
    """``--input`` values as a feed: ``NAME=FILE`` each, a single FILE for a one-input model, or one .npz."""
    feed: Dict[str, Any] = {}
    for value in values:
        name, _, path = value.partition("=")
        if not path or name not in names:  # no NAME= prefix (a path may itself hold "=")
            name, path = "", value
        if name in feed:
            raise InputError(f"--input {name}= given twice")
        loaded = _load_array(Path(path))
        if isinstance(loaded, dict):
            if name:
                raise InputError(f"{path} is an .npz; give NAME=FILE.npy, or the .npz alone")
            feed.update(loaded)
        elif name:
            feed[name] = loaded
        elif len(names) == 1 and len(values) == 1:
            feed[names[0]] = loaded
        else:
            raise InputError(f"the model has inputs {', '.join(names)}: give --input NAME=FILE for each")
    return feed


def _write_atomic(path: Path, save: Any) -> None:
    """``save(handle)`` into ``path`` through ``safe_io.atomic_writer``: never half a file, never through a
    planted link, and no temp file left behind when the write fails (a full disk, a read-only folder)."""
    from edge_runtime.safe_io import atomic_writer

    try:
        with atomic_writer(path) as handle:
            save(handle)
    except OSError as error:
        raise InputError(f"cannot write {path} ({error.strerror or error})") from None


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_runtime.session import InferenceSession

    session = InferenceSession(args.model_dir, kernels=args.kernels, threads=args.threads)
    feed = _input_feed(args.input, [arg.name for arg in session.get_inputs()])
    outputs = session.run(None, feed)
    names = session.manifest["outputs"]
    if args.output is not None:
        _write_atomic(args.output, lambda handle: np.save(handle, outputs[0]))
        print(f"wrote {args.output}: shape {list(outputs[0].shape)}")
    if args.out is not None:
        if args.out.suffix != ".npz":
            raise InputError(f"--out {args.out}: give a .npz file name")
        _write_atomic(args.out, lambda handle: np.savez(handle, **dict(zip(names, outputs))))
        print(f"wrote {args.out}: {', '.join(names)}")
    for name, value in zip(names, outputs):
        if args.print:
            print(f"{name}: shape {list(value.shape)} {value.dtype}\n{np.array2string(value, threshold=10000)}")
        elif args.output is None and args.out is None:
            top = (f", argmax per example {value.reshape(value.shape[0], -1).argmax(axis=1).tolist()}"
                   if value.ndim and value.size else "")
            print(f"{name}: shape {list(value.shape)} {value.dtype}{top}")
    return 0


def _check(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_runtime import variants
    from edge_runtime.model_dir import read_sample
    from edge_runtime.session import InferenceSession

    session = InferenceSession(args.model_dir, kernels=args.kernels, threads=args.threads)
    if session.plain_onnx:
        return _check_plain(args, session)
    feed, expected, atol = read_sample(args.model_dir, session.manifest)
    variant = variants.expected_sample(session.manifest, session.engine)
    if session.engine in variants.ENGINES:
        if variant is None:
            raise EdgeRuntimeError(f"{args.model_dir}: the {session.variant['name']} variant records no sample "
                                   "output to check against")
        expected, atol = variant
    got = session.run(None, feed)[0]
    diff = (float(np.max(np.abs(got.astype(np.float64) - expected), initial=0.0)) if got.shape == expected.shape
            else float("inf"))
    if not diff <= atol:
        print(f"edge-runtime check: FAIL {args.model_dir}: sample output differs by {diff:.3g} (> {atol})",
              file=sys.stderr)
        return 1
    print(f"ok {args.model_dir}: sha256 verified, sample matches (max abs diff {diff:.2g}, "
          f"engine {session.engine}, variant {session.variant['name']})")
    return 0


def _check_plain(args: argparse.Namespace, session: Any) -> int:
    """A plain .onnx records no sample: run it on seeded inputs and compare with stock onnxruntime."""
    import numpy as np

    from edge_runtime.bench import random_feed
    from edge_runtime.session import InferenceSession

    feed = random_feed(session.get_inputs(), 1, 0)
    got = session.run(None, feed)
    if session.engine != "native":
        print(f"ok {args.model_dir}: runs (engine {session.engine}; no sample to compare in a plain ONNX file)")
        return 0
    expected = InferenceSession(args.model_dir, kernels="ort", threads=args.threads).run(None, feed)
    def relative(value: Any, reference: Any) -> float:
        if value.shape != reference.shape:
            return float("inf")
        scale = max(1.0, float(np.max(np.abs(reference), initial=0.0)))
        return float(np.max(np.abs(value.astype(np.float64) - reference), initial=0.0)) / scale

    diff = max(relative(g, e) for g, e in zip(got, expected))
    if not diff <= PLAIN_CHECK_TOLERANCE:
        print(f"edge-runtime check: FAIL {args.model_dir}: native output differs from onnxruntime by {diff:.3g} "
              f"(> {PLAIN_CHECK_TOLERANCE})", file=sys.stderr)
        return 1
    print(f"ok {args.model_dir}: native output matches onnxruntime on seeded inputs (max rel diff {diff:.2g})")
    return 0


def _info_plain(args: argparse.Namespace) -> int:
    """Inputs, outputs and weight layers (with the storage chosen at load) of a plain .onnx file."""
    from edge_runtime.onnx_file import load_onnx_file

    manifest, _ = load_onnx_file(args.model_dir)
    print(f"ONNX file {args.model_dir}  (opset {manifest['opset']}, {args.model_dir.stat().st_size:,} bytes)")
    for kind, specs in (("input ", manifest["inputs"]), ("output", manifest["output_specs"])):
        for spec in specs:
            print(f"{kind} {spec['name']} {spec['shape']} {spec['dtype']}")
    print(f"{'layer':<28} {'op':<7} {'shape':<18} {'sparsity':>8}  storage")
    for layer in manifest["layers"]:
        shape = "x".join(str(d) for d in layer["shape"])
        print(f"{layer['name']:<28} {layer['op']:<7} {shape:<18} {layer['sparsity']:>8.1%}  {layer['storage']}")
    print("plan: measured at each load (edge-runtime tune shows it); nothing is cached for a plain file")
    return 0


def _info(args: argparse.Namespace) -> int:
    from edge_runtime import plan as plans
    from edge_runtime.model_format import shipped_bytes, structured_summary
    from edge_runtime.model_dir import read_manifest
    from edge_runtime.onnx_file import is_onnx_file

    if is_onnx_file(args.model_dir):
        return _info_plain(args)
    manifest = read_manifest(args.model_dir)
    spec = manifest["input"]
    print(f"MODEL_DIR {args.model_dir}  (format {manifest['format_version']})")
    print(f"input  {spec['name']} {spec['shape']} {spec['dtype']};  outputs {', '.join(manifest['outputs'])}")
    accuracy = manifest.get("accuracy")
    dense_onnx = manifest.get("sizes", {}).get("dense_onnx", 0)
    removed = structured_summary(manifest.get("source"), manifest.get("sparsity") or 0.0)
    # a structured model is a smaller dense network: what was removed, not zeros it does not hold
    print((f"structured: {removed}" if removed else f"sparsity {manifest.get('sparsity', 0):.1%}") + "   accuracy "
          f"{f'{accuracy:.2%}' if accuracy is not None else '-'}"
          f"   size {human_bytes(shipped_bytes(args.model_dir, manifest))}"
          + (f" (dense ONNX {human_bytes(dense_onnx)})" if dense_onnx else ""))
    threads = args.threads or os.cpu_count() or 1
    cached = plans.load_cached(args.model_dir, plans.plan_key(manifest, threads)) or {}
    kinds = cached.get("layers", {})
    print(f"{'layer':<28} {'op':<7} {'shape':<18} {'sparsity':>8}  {'storage':<7} plan")
    for layer in manifest.get("layers", []):
        shape = "x".join(str(d) for d in layer["shape"])
        print(f"{layer['name']:<28} {layer['op']:<7} {shape:<18} {layer['sparsity']:>8.1%}  "
              f"{layer['storage']:<7} {kinds.get(layer['weight'], '-')}")
    _print_variants(manifest, cached.get("engine"))
    if cached:
        timed = ", ".join(f"{engine} {_ms(ms)}" for engine, ms in (cached.get("engine_ms") or {}).items()
                          if isinstance(ms, (int, float)))
        print(f"plan ({counted(threads, 'thread')}): engine {cached.get('engine')}"
              + _where_it_runs(cached, " (", ")")
              + "; " + (timed or f"native {_ms(cached.get('native_ms'))}, onnxruntime {_ms(cached.get('ort_ms'))}"))
    else:
        print(f"plan ({counted(threads, 'thread')}): not tuned on this device yet (edge-runtime tune)")
    return 0


def _where_it_runs(plan: Dict[str, Any], before: str, after: str = "") -> str:
    """What a plan's engine means, for engines other than native."""
    if plan.get("engine") == "split":
        return f"{before}onnxruntime up to {plan.get('cut')}, native kernels after it{after}"
    return f"{before}the whole model runs in onnxruntime{after}" if plan.get("engine") != "native" else ""


def _ms(value: Optional[float]) -> str:
    """Milliseconds rounded to what the measurement can tell (3 significant digits)."""
    return "-" if not isinstance(value, (int, float)) else f"{value:.3g} ms"


def _print_variants(manifest: dict, engine: Optional[str]) -> None:
    """One line per variant (fp32, int8): file, engine, accuracy, size; a star marks the one the plan runs."""
    from edge_runtime import variants

    running = variants.describe(manifest, engine or "ort")["name"] if engine else None
    for entry in variants.listed(manifest):
        accuracy, size = entry.get("accuracy"), entry.get("size")
        shown = f"{accuracy:.2%}" if isinstance(accuracy, float) else "-"
        print(f"variant {entry['name']:<5}{'*' if entry['name'] == running else ' '} {entry['file']:<16} "
              f"engine {entry.get('engine', '-'):<9} accuracy {shown}"
              f"   size {f'{size:,}' if isinstance(size, int) else '-'} bytes")


def _to_onnx(args: argparse.Namespace) -> int:
    """Write OUT.onnx (written beside, then renamed: never half a file), then run it in stock
    onnxruntime on the MODEL_DIR's sample when onnxruntime is here."""
    from edge_runtime.onnx_embed import model_dir_to_onnx

    if onnx_file.is_onnx_file(args.model_dir):
        raise EdgeRuntimeError(f"{args.model_dir} is already a plain ONNX file")
    if args.out.exists() and not args.force:
        raise EdgeRuntimeError(f"{args.out} exists (use --force to replace it)")
    _refuse_model_dir_file(args.out, args.model_dir)
    data = model_dir_to_onnx(args.model_dir, args.variant)
    _write_atomic(args.out, lambda handle: handle.write(data))
    print(f"wrote {args.out}: {human_bytes(len(data))}, the {args.variant} model of {args.model_dir} "
          f"with every weight inline{_stock_check(args)}")
    return 0


def _refuse_model_dir_file(out: Path, model_dir: Path) -> None:
    """OUT must not be a file of a MODEL_DIR (this one or another): ``--force`` would break its sha256s.

    A file is a MODEL_DIR's when the manifest.json of a folder above it lists it (or it is that manifest).
    """
    from edge_runtime.model_format import MANIFEST_FILE, listed_files, read_manifest

    target = out.parent.resolve() / out.name
    for folder in target.parents:
        if not (folder / MANIFEST_FILE).is_file():
            continue
        name = target.relative_to(folder).as_posix()
        try:
            names = set(listed_files(read_manifest(folder), str(folder / MANIFEST_FILE)))
        except (EdgeRuntimeError, OSError):  # unreadable: still never the files every MODEL_DIR has
            names = {"model.onnx", "weights.npz"}
        if name in names | {MANIFEST_FILE}:
            which = "this" if folder == Path(model_dir).resolve() else "the"
            raise EdgeRuntimeError(f"{out} is part of {which} MODEL_DIR {folder} (listed in its manifest); "
                                   "write the ONNX file elsewhere")
        return


def _stock_check(args: argparse.Namespace) -> str:
    """", checked: stock onnxruntime ... matches" — or "" when onnxruntime is not installed here."""
    import numpy as np

    from edge_runtime import variants
    from edge_runtime.model_dir import read_manifest, read_sample

    try:
        import onnxruntime as ort
    except ImportError:
        return ""
    manifest = read_manifest(args.model_dir)
    try:
        feed, expected, atol = read_sample(args.model_dir, manifest)
    except ModelDirError:
        return ""
    if args.variant != "fp32":
        expected, atol = variants.expected_sample(manifest, "ort-int8") or (expected, float("inf"))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        got = ort.InferenceSession(str(args.out), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    except Exception as error:  # onnxruntime's errors are untyped
        raise ModelDirError(f"stock onnxruntime cannot run the written {args.out}: {error}") from None
    diff = float(np.max(np.abs(got.astype(np.float64) - expected), initial=0.0)) if got.shape == expected.shape \
        else float("inf")
    if not diff <= atol:
        raise ModelDirError(f"stock onnxruntime on {args.out} differs from the sample by {diff:.3g}")
    return f"; stock onnxruntime reproduces the sample (max abs diff {diff:.2g})"


def _tune(args: argparse.Namespace) -> int:
    from edge_runtime.session import InferenceSession

    session = InferenceSession(args.model_dir, kernels="auto", threads=args.threads, retune=True)
    plan = session.plan
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        counts = {}
        for kind in plan.get("layers", {}).values():
            counts[kind] = counts.get(kind, 0) + 1
        whole = _where_it_runs(plan, " — ")
        print(f"tuned {args.model_dir} for {counted(session.threads, 'thread')}: engine {plan['engine']}{whole} "
              f"(variant {session.variant['name']}), "
              f"layers {', '.join(f'{n} {kind}' for kind, n in counts.items()) or '-'}; measured "
              + ", ".join(f"{engine} {_ms(ms)}" for engine, ms in (plan.get("engine_ms") or {
                  "native": plan.get("native_ms") or 0, "onnxruntime": plan.get("ort_ms") or 0}).items())
              + (f"; cached in {plan.get('cache_path')}" if not session.plain_onnx
                 else "; not cached (a plain ONNX file is tuned at each load)"))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from edge_runtime.bench import benchmark

    from edge_runtime.onnx_file import is_onnx_file

    threads = args.threads or os.cpu_count() or 1
    if args.kernels == "auto" and not is_onnx_file(args.model_dir):
        _ensure_plan(args.model_dir, threads)
    report = benchmark(args.model_dir, args.kernels, threads, args.warmup, args.iters, args.min_seconds,
                       args.batch)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        lat = report["latency_ms"]
        variant = report["variant"]
        accuracy = f", accuracy {variant['accuracy']:.2%}" if isinstance(variant.get("accuracy"), float) else ""
        print(f"{args.model_dir}: kernels {report['kernels']} (engine {report['engine']}, variant "
              f"{variant['name']}{accuracy}), {counted(report['threads'], 'thread')}, "
              f"batch {report['batch']}: mean {lat['mean']:.3f} ms, p50 {lat['p50']:.3f}, "
              f"p99 {lat['p99']:.3f}; {report['throughput_per_s']:.1f}/s; load {report['load_s']:.3f} s; "
              f"peak RSS {report['peak_rss_mb']:.1f} MB; {report['iterations']} runs")
    return 0


def _ensure_plan(model_dir: Path, threads: int) -> None:
    """Tune in a child process when no plan is cached, so the bench's peak RSS is the model's alone."""
    from edge_runtime import plan as plans
    from edge_runtime.model_dir import read_manifest

    manifest = read_manifest(model_dir)
    if plans.load_cached(model_dir, plans.plan_key(manifest, threads)) is not None:
        return
    command: List[str] = [sys.executable, "-m", "edge_runtime", "tune", str(model_dir), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise EdgeRuntimeError((done.stderr.strip().splitlines() or ["tuning failed"])[-1])


if __name__ == "__main__":
    sys.exit(main())
