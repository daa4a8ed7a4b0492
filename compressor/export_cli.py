"""``edgeprune export``: write a pruned level (or any model + checkpoint) as a MODEL_DIR.

    edgeprune export RUN_DIR --out MODEL_DIR [--method M] [--level K | --max-drop POINTS] [--model FILE.py:FACTORY]
    edgeprune export --model NAME_OR_FILE.py:FACTORY [--checkpoint FILE.pt] --out MODEL_DIR
    ... [--output logits] [--sample inputs.npz]   # a model with several / integer inputs (Hugging Face)

Reading a RUN_DIR never runs a Python file that the run names: a run made with a user factory is
exported only with ``--model FILE.py:FACTORY`` given here (the run's error message names the file
and its recorded sha256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compressor.errors import CompressorError

# OSError: an unwritable --out, a full disk, an unreadable checkpoint are the user's to fix.
USER_ERRORS = (CompressorError, OSError)
QUANTIZE = ("auto", "none", "int8", "fp16")
AUTO_MAX_DROP = 1.0  # points: what --quantize auto lets the int8 variant lose when --max-drop is not given


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,32,32, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return shape


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the export arguments."""
    parser.add_argument("run_dir", nargs="?", type=Path, help="a RUN_DIR written by `edgeprune compress`")
    parser.add_argument("--out", type=Path, required=True, help="the MODEL_DIR to write")
    parser.add_argument("--method", help="retraining method whose level to export (default: the run's first)")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--level", type=int, help="export this level (0 = dense)")
    pick.add_argument("--max-drop", type=float, metavar="POINTS",
                      help="export the sparsest level whose accuracy is within POINTS percentage points of dense")
    parser.add_argument("--model", help="a built-in model name or path/to/file.py:factory: instead of a RUN_DIR, "
                        "or with one whose model is a factory file (runs that file: name only one you trust)")
    parser.add_argument("--data", metavar="FILE.py:FACTORY",
                        help="with a RUN_DIR made with a data factory: run that factory for the example inputs "
                        "(name only one you trust; default: the run's built-in data, else --sample or noise)")
    parser.add_argument("--checkpoint", type=Path, help="with --model: a state_dict or edgeprune checkpoint (.pt)")
    parser.add_argument("--input-shape", type=_shape, help="one example's shape without batch, e.g. 3,32,32 "
                        "(default: the model's input_shape, or the run's); with a RUN_DIR: export at another "
                        "size than trained, e.g. 3,128,128 for a CNN trained at 32x32")
    parser.add_argument("--output", metavar="NAME", help="the model output to export when it returns a tuple, "
                        "dict or ModelOutput: a key or position (default: the run's --output, else logits, "
                        "else the first tensor)")
    parser.add_argument("--sample", type=Path, metavar="INPUTS.npz",
                        help="example inputs (.npz, batch first): one member per keyword input of the model's "
                             "forward (input_ids, attention_mask, ...), or one member 'input' (default: the "
                             "run's test data, else seeded noise of --input-shape)")
    parser.add_argument("--fp16", action="store_true", help="store weight values as float16 (half the value "
                        "bytes; the same as --quantize fp16)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty MODEL_DIR")
    parser.add_argument("--quantize", choices=QUANTIZE, default="auto",
                        help="auto (default): when there is data to calibrate and measure (a run with built-in "
                        "data, or --data), also build the int8 variant and ship it if it stays within "
                        "--max-drop (default 1 point) of the level's fp32 accuracy; none: fp32 only; int8: "
                        "always build the int8 variant (model.int8.onnx, onnxruntime's quantizer: dynamic for "
                        "MatMul/Gemm models, static QDQ per-channel for Conv). A shipped int8 variant's weights "
                        "become the only stored copy, which the fp32 engines run dequantized. fp16: store "
                        "weight values as float16")
    parser.add_argument("--layout", choices=("compact", "external"), default="compact",
                        help="compact (default, format 3): each weight stored once in weights.npz in its "
                        "smallest form, fed to onnxruntime at load (`edge-runtime to-onnx` writes a plain "
                        "ONNX file); external (formats 1-2): model.onnx reads its weights from weights.npz "
                        "as ONNX external data, so stock onnxruntime loads it as it is")
    parser.add_argument("--calibration-batches", type=int, default=8, metavar="N",
                        help="with --quantize on a Conv model: calibrate on N batches of the run's training "
                             "data (default 8)")


def run(args: argparse.Namespace) -> int:
    """Export, then print where and how big."""
    from compressor.errors import ConfigError
    from compressor.export.from_run import export_checkpoint, export_run_dir, read_sample
    fp16 = args.fp16 or args.quantize == "fp16"
    if args.calibration_batches < 1:
        raise ConfigError(f"--calibration-batches must be at least 1, got {args.calibration_batches}")
    if args.quantize == "int8" and args.fp16:
        raise ConfigError("--quantize int8 starts from float32 weights; drop --fp16")
    if args.fp16 and args.quantize == "auto":
        args.quantize = "fp16"
    dtype = "float16" if fp16 else "float32"
    # int8 is built from the external layout's float32 model, then the folder is made compact
    layout = "external" if args.quantize in ("int8", "auto") else args.layout
    sample = read_sample(args.sample) if args.sample is not None else None
    if args.run_dir is None and args.model is None:
        raise ConfigError("give either a RUN_DIR or --model (with --checkpoint)")
    if args.run_dir is not None:
        if args.checkpoint:
            raise ConfigError("--checkpoint goes with --model alone, not with a RUN_DIR")
    elif args.data is not None:
        raise ConfigError("--data names a RUN_DIR's data factory; with --model alone give --sample")
    if args.run_dir is not None:
        result = export_run_dir(args.run_dir, args.out, method=args.method, level=args.level,
                                max_drop=args.max_drop, values_dtype=dtype, output=args.output, sample=sample,
                                force=args.force, model=args.model, data=args.data, layout=layout,
                                input_shape=args.input_shape)
    else:
        if args.method or args.level is not None or args.max_drop is not None:
            raise ConfigError("--method/--level/--max-drop select a level of a RUN_DIR; not with --model")
        result = export_checkpoint(args.model, args.checkpoint, args.out, input_shape=args.input_shape,
                                   values_dtype=dtype, output=args.output, sample=sample, force=args.force,
                                   layout=layout)
    if result.picked:
        print(result.picked)
    if args.quantize == "int8" or (args.quantize == "auto" and _auto_int8(args)):
        _quantize(args)
    manifest = None
    if args.quantize in ("int8", "auto") and args.layout == "compact":
        manifest = _compact(args)
    _report(args.out, result, manifest)
    return 0


def _auto_int8(args: argparse.Namespace) -> bool:
    """Whether ``--quantize auto`` builds the int8 variant: only with data to calibrate on and to measure
    its accuracy against (else one line says why not), and for a single float32 input."""
    import json

    from compressor.export.quantize import usable_data

    manifest = json.loads((args.out / "manifest.json").read_text())
    data = args.data or (manifest.get("source") or {}).get("data")
    inputs = manifest.get("inputs") or [manifest["input"]]
    if not usable_data(data, trusted=args.data is not None):
        why = "no data to calibrate and measure it (export a run with built-in data, or give --data)"
    elif len(inputs) != 1 or inputs[0]["dtype"] != "float32":
        why = "the model's input is not a single float32 tensor"
    else:
        return True
    print(f"no int8 variant: {why}; --quantize int8 builds one anyway")
    return False


def _compact(args: argparse.Namespace) -> dict:
    """Rewrite the int8 MODEL_DIR as format 3 (compressor/export/compact.py): its int8 weights become the only
    copy, which the fp32 engines run dequantized, so their accuracy is measured again."""
    from compressor.export.compact import compact_model_dir
    from compressor.export.quantize import refresh_fp32_accuracy

    manifest = compact_model_dir(args.out, "float32")
    if any(entry.get("name") == "int8" for entry in manifest.get("variants", [])):
        refresh_fp32_accuracy(args.out, manifest, args.data, trusted_data=args.data is not None)
    return manifest


def _report(out: Path, result, manifest) -> None:
    """One line: where, how big, how sparse (or, structured, how much smaller the network), how stored."""
    from edge_runtime.model_dir import read_manifest
    from edge_runtime.model_format import shipped_bytes, structured_summary

    manifest = manifest or read_manifest(out)
    size = shipped_bytes(out, manifest)
    ratio = result.dense_onnx_bytes / max(size, 1)
    layers = manifest.get("layers", [])
    sparse = sum(1 for layer in layers if layer["storage"] == "csr")
    int8 = sum(1 for info in manifest["tensors"].values() if info["dtype"] == "int8")
    values = "int8" if int8 else manifest.get("values_dtype", "float32")
    removed = structured_summary(manifest.get("source"), result.sparsity)
    if removed:  # a smaller dense network: its own dense ONNX is no baseline, and it has no zeros to count
        print(f"wrote {out}: {size / 1024:.1f} KiB, structured: {removed}, "
              f"{sparse}/{len(layers)} layers stored as CSR, {values} values, format {manifest['format_version']}")
    else:
        print(f"wrote {out}: {size / 1024:.1f} KiB ({ratio:.2f}x smaller than dense ONNX), sparsity "
              f"{result.sparsity:.1%}, {sparse}/{len(layers)} layers stored as CSR, {values} values, "
              f"format {manifest['format_version']}")
    if manifest["format_version"] >= 3:
        print(f"plain ONNX file: edge-runtime to-onnx {out} model.onnx")
    if ratio < 1 and sparse:
        print(f"warning: this MODEL_DIR is larger than the dense ONNX ({result.dense_onnx_bytes / 1024:.1f} KiB): "
              "at this sparsity CSR does not pay (below ~72% with --layout external's int64 ONNX indices), "
              "and a small model carries the manifest's graph",
              file=sys.stderr)
    elif ratio < 1 and not removed:
        print(f"note: this MODEL_DIR is larger than the dense ONNX ({result.dense_onnx_bytes / 1024:.1f} KiB): "
              "a small model carries the manifest's graph", file=sys.stderr)


def _quantize(args: argparse.Namespace) -> None:
    """Add the int8 variant to the MODEL_DIR just written; one line says what was (not) shipped."""
    import json

    from compressor.export.quantize import add_int8_variant, dense_level_accuracy

    manifest = json.loads((args.out / "manifest.json").read_text())
    source = manifest.get("source") or {}
    reference, max_drop = None, args.max_drop  # None: against this level's own fp32 accuracy
    if args.run_dir is not None and args.max_drop is not None:
        reference = dense_level_accuracy(args.run_dir, source.get("method"))
    if args.quantize == "auto" and max_drop is None:
        max_drop = AUTO_MAX_DROP
    try:
        results = add_int8_variant(args.out, data_spec=args.data or source.get("data"),
                                   input_shape=manifest["input"]["shape"][1:],
                                   calibration_batches_count=args.calibration_batches,
                                   reference_accuracy=reference, max_drop=max_drop,
                                   trusted_data=args.data is not None)
    except CompressorError as error:
        if args.quantize != "auto":
            raise
        print(f"no int8 variant: {error}")  # auto: the fp32 MODEL_DIR is complete without it
        return
    for result in results:
        print(result.message)
