"""Which default rounding keeps ``--target-macs`` efficient at 128×128 (#18): per-variant widths and measured speed-up.

    python3 benchmarks/studies/default_rounding.py --json benchmarks/results/default_rounding.json

For resnet20 and the MobileNetV2-shaped net of ``prune_to_device`` at 3×128×128 (dense trained briefly on
digits, the study's way), the default structured plan (``--structure channels``, global L1) at 50% and 70%
MACs removed under each rule for where the narrowest width (8) is allowed; every plan's network is timed side by
side with the dense one (``compressor.prune.latency.side_by_side``: what the planner and the study use).
Efficiency = measured speed-up / (dense MACs / MACs). Widths are printed per group so a slow plan shows
which layers it cut to what.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.studies.prune_to_device import data, make_model, retrain  # noqa: E402
from compressor.config import PruneConfig  # noqa: E402
from compressor.prune.channels import params_and_macs  # noqa: E402
from compressor.prune.criteria import criterion_named  # noqa: E402
from compressor.prune.examples import example_input  # noqa: E402
from compressor.prune.latency import LocalLatency, network_onnx, side_by_side  # noqa: E402
from compressor.prune.levels import ChannelLevels  # noqa: E402
from edge_runtime.safe_io import atomic_write_text  # noqa: E402

VARIANTS = {"8 anywhere (old default)": "anywhere", "8 only in groups <= 16 (default)": None,
            "floor half the group": "half"}


def _floor(rule: str):
    """A stand-in for ``channels.floor_width`` (the default's rule) under another rule."""
    def floor(g, multiple: int, narrowest: int) -> int:
        return narrowest if rule == "anywhere" else max(narrowest, g.size // g.blocks // 2)
    return floor


def plan_row(dense, example, rule: Optional[str], target: float) -> Dict[str, Any]:
    """The default plan (multiples of 16, 8 the narrowest) at ``target`` with the floor ``rule``."""
    from compressor.prune import channels, latency

    original = channels.floor_width
    if rule is not None:
        channels.floor_width = latency.floor_width = _floor(rule)
    try:
        return _plan_row(dense, example, 16, 8, target)
    finally:
        channels.floor_width = latency.floor_width = original


def _plan_row(dense, example, multiple: int, narrowest: int, target: float) -> Dict[str, Any]:
    config = PruneConfig(structure="channels", target_macs=target, one_shot=True, channel_multiple=multiple,
                         min_channels=narrowest)
    levels = ChannelLevels(dense, None, config, criterion_named(None, "channels"), example=example)
    plan, _ = levels.next_plan(dense, levels.dense_plan())
    model = levels.build(plan, dense.state_dict(), "", state_is_dense=True)
    widths = {root: len(kept) for root, kept in sorted(plan.channels.items())}
    full = {g.root: g.size for g in levels.groups}
    return {"model": model, "widths": widths, "dense_widths": full}


def run_case(name: str, size: int, args) -> List[Dict[str, Any]]:
    shape = (3, size, size)
    example = example_input(shape)
    train, _ = data((3, 32, 32) if name == "resnet20" else shape, None if name == "resnet20" else 96, 64)
    dense = make_model(name, 32 if name == "resnet20" else size)
    retrain(dense, train, 1 if name == "resnet20" else 2, 0.1 if name == "resnet20" else 0.05)
    dense = dense.eval()
    _, dense_macs = params_and_macs(dense, example)
    dense_onnx = network_onnx(dense, example)
    rows = []
    for target in args.targets:
        for label, rule in VARIANTS.items():
            try:
                row = plan_row(dense, example, rule, target)
            except Exception as error:  # out of reach under this rounding
                print(f"| {name}@{size} | {target:.0%} | {label} | {str(error)[:100]} |", flush=True)
                continue
            _, macs = params_and_macs(row["model"], example)
            dense_ms, ms = side_by_side(LocalLatency(), dense_onnx, network_onnx(row["model"], example), 1)
            speedup = dense_ms / ms
            record = {"model": name, "size": size, "target_macs": target, "rounding": label,
                      "macs_removed": 1 - macs / dense_macs, "dense_ms": dense_ms, "ms": ms, "speedup": speedup,
                      "efficiency": speedup / (dense_macs / macs), "widths": row["widths"],
                      "dense_widths": row["dense_widths"]}
            rows.append(record)
            narrow = sorted(f"{w}/{row['dense_widths'][r]}" for r, w in row["widths"].items())
            print(f"| {name}@{size} | {target:.0%} | {label} | {record['macs_removed']:.1%} | {ms:.3f} | "
                  f"{speedup:.2f}x | {record['efficiency']:.2f} | {' '.join(narrow)} |", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="resnet20@128,mobilenetv2@128")
    parser.add_argument("--json", default="default_rounding.json")
    parser.add_argument("--targets", default="0.5,0.7", help="MAC fractions to remove, comma separated")
    args = parser.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    torch.set_num_threads(1)
    print("| case | MACs target | rounding | MACs removed | p50 ms | speed-up | efficiency | widths/dense |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    rows = []
    for case in args.cases.split(","):
        name, size = case.split("@")
        rows += run_case(name, int(size), args)
        atomic_write_text(Path(args.json), json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
