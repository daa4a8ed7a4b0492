"""``edgeprune compress``: train a model and prune it iteratively, with learning-rate rewinding.

Only the standard library and ``compressor.errors`` are imported at module level: the ``edgeprune``
front imports this module to build ``--help``, and must stay fast and torch-free until ``run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from compressor.errors import CompressorError
from edge_runtime.errors import EdgeRuntimeError  # a latency table's faults (edge_runtime.layer_timing)

USER_ERRORS = (CompressorError, EdgeRuntimeError, OSError)

EXAMPLES = """\
examples:
  edgeprune compress --model digits-mlp --data digits --target-sparsity 0.9 --out runs/mlp
  edgeprune compress --model digits-cnn --method lr-rewind,finetune,weight-rewind --out runs/cmp
  edgeprune compress --model resnet20 --data cifar10:~/data/cifar-10-batches-py --out runs/r20
  edgeprune compress --model my_net.py:build --data my_data.py:loaders --out runs/mine
  edgeprune compress --model resnet20 --structure channels --target-macs 0.5 --out runs/r20-ch
  edgeprune compress --model resnet20 --structure channels,blocks --allocate latency --target-speedup 2.5 --out runs/r20-d
  edgeprune compress ... --out runs/mlp --resume        # continue a killed run
"""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments; every hyper-parameter comes from ``PruneConfig``'s fields."""
    from compressor.config import PRESETS, PruneConfig  # stdlib-only module

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    from compressor.config import MODEL_NAMES

    parser.add_argument("--model", default="digits-mlp",
                        help=f"{', '.join(MODEL_NAMES)} or path/to/file.py:factory (default: %(default)s)")
    parser.add_argument("--data", default="digits",
                        help="digits, cifar10:DIR (python-format batches) or path/to/file.py:factory "
                             "returning (train, test) (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="where checkpoints and results go")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN_DIR (refused if its config differs)")
    parser.add_argument("--pretrained", metavar="CKPT",
                        help="start from this trained state_dict (.pt) instead of training the dense model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads per process for torch (default: torch's choice). Small models "
                             "train faster on 1; not part of the run's config, so --resume may change it")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bars on stderr; --no-progress prints nothing but the result "
                        "(default: bars on a terminal, else a plain line per level and a few per level's epochs)")

    group = parser.add_argument_group("training and pruning (defaults are for the digits models; "
                                      "resnet20/56 use the paper's schedule)")
    defaults = PruneConfig()
    for f in dataclasses.fields(PruneConfig):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        default = getattr(defaults, f.name) if f.name != "lr_drops" else None
        preset_notes = sorted({f"{m}: {_show(p[f.name])}" for m, p in PRESETS.items()
                               if f.name in p and p[f.name] != default and m.startswith("resnet")})
        note = f" (default: {_show(default)}" + ("; " + ", ".join(preset_notes) if preset_notes else "") + ")"
        help_text = f.metadata["help"] + (note if default is not None else "")
        kwargs: dict = {"dest": f.name, "default": None, "help": help_text.replace("%", "%%")}
        if isinstance(default, bool):
            group.add_argument(flag, action="store_true", **kwargs)
        elif isinstance(default, (int, float)):
            group.add_argument(flag, type=type(default), metavar=f.name.upper(), **kwargs)
        else:  # strings and comma separated lists: PruneConfig parses and validates them
            group.add_argument(flag, type=str, metavar=f.name.upper(), **kwargs)


def _epoch_lines(epochs: int, lines_per_level: int = 4):
    """An epoch callback printing about ``lines_per_level`` lines per level (for logs without a bar)."""
    every = max(1, epochs // lines_per_level)

    def report(method: str, level: int, epoch: int) -> None:
        if (epoch + 1) % every == 0 and epoch + 1 < epochs:
            name = "dense" if level == 0 else f"{method} level {level}"
            print(f"{name}: epoch {epoch + 1}/{epochs}", file=sys.stderr, flush=True)
    return report


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def run(args: argparse.Namespace) -> int:
    """Build model, data and config, run :func:`compressor.compress`, print the result table.

    Under torchrun every process runs this, joined in one process group; rank 0 alone prints.
    """
    from compressor.train.distributed import session

    try:
        with session(args.device):
            return _compress_and_report(args)
    except KeyboardInterrupt:
        # Every finished epoch is checkpointed: say how to continue rather than just "interrupted".
        print(f"edgeprune compress: interrupted; continue where it stopped with the same command plus --resume "
              f"(--out {args.out})", file=sys.stderr)
        return 130


def _compress_and_report(args: argparse.Namespace) -> int:
    from compressor import checkpoints
    from compressor.config import PruneConfig, config_for
    from compressor.train.data import input_shape_for, load_data_and_loss
    from compressor.train.models import build_model
    from compressor.train.distributed import is_main_process
    from compressor.pipeline import compress, log_lines_to_stderr
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise CompressorError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig)}
    config = config_for(args.model, **overrides)
    pretrained = checkpoints.load_state_dict(args.pretrained) if args.pretrained else None
    torch.manual_seed(config.seed)  # the dense initialisation is part of the run's reproducibility
    model = build_model(args.model)
    train_loader, test_loader, loss_fn = load_data_and_loss(args.data, input_shape_for(model), config.batch_size,
                                                            config.seed)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    # A log file or CI (no terminal, nothing asked): a line per level and a few per level's epochs.
    lines = args.progress is None and not progress and is_main_process()
    with log_lines_to_stderr(lines):
        result = compress(model, train_loader, test_loader, config, out=args.out, resume=args.resume,
                          device=args.device, model_name=args.model, data_name=args.data,
                          pretrained=pretrained, progress=progress, loss_fn=loss_fn,
                          epoch_callback=_epoch_lines(config.epochs) if lines else None,
                          latency_source=getattr(args, "latency_source", None))
    if not is_main_process():
        return 0
    structured = config.structured
    # unstructured: the prunable weights' sparsity (the target's) and the zeros among all parameters
    print(f"{'method':<14} {'level':>5} {'sparsity':>9} {'accuracy':>9}" + (
        "     params  MACs removed" if structured else "  sparsity of all parameters"))
    for method, levels in result.metrics["methods"].items():
        for entry in levels:  # accuracy is null under a regression loss: printed "nan%"
            extra = f" {entry['params']:>10,} {entry['macs_removed']:>13.2%}" if structured else (
                f" {entry['sparsity_all']:>27.2%}" if entry.get("sparsity_all") is not None else "")
            print(f"{method:<14} {entry['level']:>5} {entry['sparsity']:>9.2%} {float('nan') if entry['accuracy'] is None else entry['accuracy']:>9.2%}{extra}")
    print(f"results: {args.out}/metrics.json, report.md, sparsity_accuracy.png")
    return 0
