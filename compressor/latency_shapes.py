"""``python3 -m compressor.latency_shapes``: the layer shapes a model's latency table must cover.

``--shapes-out FILE`` lists them (to measure on a device with ``python3 -m edge_runtime.layer_timing
--shapes FILE --out TABLE``, numpy + onnxruntime only); ``--out TABLE`` measures them on this machine.
A front-door script (it builds a registry model, so it sits above ``train`` and ``prune``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from compressor.errors import CompressorError
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.layer_timing import LatencyTableError, LayerShape, measure, read_shapes, write_shapes
from edge_runtime.safe_io import atomic_write_text


def model_shapes(model_name: str, multiple: Optional[int], min_channels: Optional[int],
                 exclude: Sequence[str]) -> List[LayerShape]:
    """Every layer shape ``--allocate latency`` may ask about for this model (needs torch); ``multiple``
    None is compress's default rounding (16, narrowest 8 in 16-wide groups), so the shapes are the ones a run asks for."""
    from compressor.config import DEFAULT_CHANNEL_MULTIPLE, DEFAULT_MIN_CHANNELS

    if multiple is None:
        multiple, min_channels = DEFAULT_CHANNEL_MULTIPLE, min_channels or DEFAULT_MIN_CHANNELS
    from compressor.prune.channels import find_groups
    from compressor.prune.examples import example_input
    from compressor.prune.latency import LatencyModel
    from compressor.train.models import build_model, input_shape_of

    model = build_model(model_name)
    example = example_input(input_shape_of(model))
    groups = find_groups(model, example, exclude)
    return LatencyModel(model, example, groups, multiple, min_channels).shapes_needed()


def main(argv: Optional[List[str]] = None) -> int:
    """``python3 -m compressor.latency_shapes``: list a model's layer shapes, or measure a table here."""
    parser = argparse.ArgumentParser(prog="python3 -m compressor.latency_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a built-in model or file.py:factory (needs torch)")
    parser.add_argument("--channel-multiple", type=int, default=None, help="default: compress's (16, narrowest 8 in 16-wide groups)")
    parser.add_argument("--min-channels", type=int, default=None)
    parser.add_argument("--exclude", default="", help="comma separated layers kept whole (as compress)")
    parser.add_argument("--shapes-out", metavar="FILE", help="write the model's layer shapes here and stop")
    parser.add_argument("--shapes", metavar="FILE", help="measure the shapes in FILE (no torch needed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", metavar="FILE", help="where the measured table goes")
    args = parser.parse_args(argv)
    try:
        if (args.model is None) == (args.shapes is None):
            raise LatencyTableError("give --model or --shapes (one of them)")
        if args.shapes:
            shapes = read_shapes(Path(args.shapes))
        else:
            exclude = [e for e in args.exclude.split(",") if e]
            shapes = model_shapes(args.model, args.channel_multiple, args.min_channels, exclude)
        if args.shapes_out:
            write_shapes(shapes, Path(args.shapes_out))
            print(f"{len({s.key() for s in shapes})} shapes: {args.shapes_out}")
            return 0
        if not args.out or args.threads < 1:
            raise LatencyTableError("give --out FILE for the table (and --threads >= 1)")
        table = measure(shapes, args.threads)
        atomic_write_text(Path(args.out), table.to_json())
        print(f"{len(table.ms)} shapes measured ({table.measured_on}): {args.out}")
        return 0
    except (CompressorError, EdgeRuntimeError, OSError) as error:
        print(f"latency_table: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
