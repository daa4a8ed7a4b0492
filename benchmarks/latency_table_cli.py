"""``edgeprune bench TARGET --latency-table MODEL_OR_RUN --out table.json``: measure a latency table on
a device (or locally) without compressing.

MODEL_OR_RUN is a built-in model name or ``file.py:factory``, or a compress RUN_DIR whose config.json
gives the model, channel multiple, exclusions, ``--quantize`` and ``--latency-threads`` (a run made with
a factory needs ``--model`` again: edgeprune never runs a file a RUN_DIR names). The table covers every
layer shape ``compress --allocate latency`` can ask about, comes from the user cache when this device
measured it before, is checked fit to plan with, and is written where ``--out`` says; ``compress
--latency-table FILE`` then plans from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from benchmarks.errors import BenchError
from edge_runtime.wording import counted


def configure(parser: argparse.ArgumentParser) -> None:
    """The flags of this mode (``--out``, ``--threads``, ``--model`` and the connection flags are bench's own)."""
    group = parser.add_argument_group("measure a latency table instead (compress --latency-table FILE plans from it)")
    group.add_argument("--latency-table", metavar="MODEL_OR_RUN",
                       help="a model name, file.py:factory or RUN_DIR: measure the layer shapes it needs on TARGET "
                            "and write the table to --out FILE (--threads: one count)")
    group.add_argument("--quantize", choices=("int8", "none"), default=None,
                       help="with --latency-table: time int8 (static QDQ, as export --quantize int8) layers "
                            "(default: the RUN_DIR's, else none: fp32)")


def run(args: argparse.Namespace) -> int:
    """Measure (or find in the cache) the table, check it, write it; 0 on success."""
    from benchmarks.remote_latency import latency_source
    from compressor.errors import CompressorError
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.layer_timing import check_for_planning
    from edge_runtime.safe_io import atomic_write_text

    if args.out is None or args.models or "," in args.target:
        raise BenchError("--latency-table needs --out FILE and one TARGET, and takes no MODEL_DIRs")
    try:
        shapes, engine, threads = _what_to_measure(args)
        source = latency_source(args.target, args, log=lambda line: print(line, file=sys.stderr))
        table = source.table(shapes, engine, threads)
        for warning in check_for_planning(table, shapes, f"the table measured on {source.describe()}"):
            print(f"warning: {warning}", file=sys.stderr)
        atomic_write_text(Path(args.out), table.to_json())
    except (CompressorError, EdgeRuntimeError, OSError) as error:
        raise BenchError(str(error)) from None
    fresh = "measured" if getattr(source, "measured", [1]) else "from the cache"
    print(f"{len(table.ms)} layer shapes {fresh} on {source.describe()} ({engine}, {counted(threads, 'thread')}): {args.out}")
    return 0


def _what_to_measure(args: argparse.Namespace) -> Tuple[List[Any], str, int]:
    """The shapes, engine and thread count ``--latency-table`` and its flags ask for."""
    from compressor.latency_shapes import model_shapes

    settings: Dict[str, Any] = {"model": args.latency_table, "channel_multiple": None, "min_channels": None,
                                "exclude": [], "quantize": None, "latency_threads": 1}
    if Path(args.latency_table).is_dir():
        settings.update(_run_settings(Path(args.latency_table)))
        if args.model:
            settings["model"] = args.model
    threads = settings["latency_threads"] if args.threads == "1" else _one_count(args.threads)
    quantize = args.quantize or settings["quantize"]
    shapes = model_shapes(settings["model"], settings["channel_multiple"], settings["min_channels"],
                          settings["exclude"])
    return shapes, "ort-int8" if quantize == "int8" else "ort", threads


def _run_settings(run_dir: Path) -> Dict[str, Any]:
    """What a RUN_DIR's config.json says about its latency tables (checked through PruneConfig)."""
    from compressor.config import MODEL_NAMES, PruneConfig
    from compressor.run.run_dir import CONFIG, read_json

    data = read_json(run_dir / CONFIG)
    fields = {k: v for k, v in data.items() if k in PruneConfig.__dataclass_fields__}
    config = PruneConfig.from_dict(fields)
    model = str(data.get("model"))
    if model not in MODEL_NAMES:
        raise BenchError(f"{run_dir} was made with the factory {model[:200]}: pass --model FILE.py:FACTORY "
                         "(edgeprune never runs a file a RUN_DIR names)")
    return {"model": model, "channel_multiple": config.channel_multiple, "min_channels": config.min_channels,
            "exclude": list(config.exclude), "quantize": config.quantize, "latency_threads": config.latency_threads}


def _one_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BenchError(f"--latency-table measures one thread count, got --threads {text!r}") from None
