"""Prune to the device (#18): targets as measured, past the per-layer floor, side by side in one run.

    python3 benchmarks/studies/prune_to_device.py                     # the reduced grid (about 12 min, 2 cores)
    python3 benchmarks/studies/prune_to_device.py --cases resnet20@32 --epochs 1 --json out.json

Per case (a model at one input size), from ONE dense training (``--dense-epochs``): the dense network; the default
(``--structure channels``, global L1, the default rounding) at 50/70% MACs removed; ``--target-speedup``
1.8/2.5/3 with ``--structure channels --allocate latency`` and ``channels,blocks``; Torch-Pruning out of
the box (MetaPruner, global L1 magnitude, round_to 8 and 16, its pruning ratio the first of 0.25..0.45
that removes ≥ 50% of the MACs); uniform width scaling (every group to 75% and 50% of its width,
multiples of 8, strongest L1 channels kept). Every row is retrained with the same budget (``--epochs``
epochs; ours through compress's lr-rewind level, the others by a plain SGD loop at the preset's LR).

Columns: params, MACs, MACs removed, accuracy, predicted speed-up (for timed targets the run's final
prediction, ``predicted_speedup`` in metrics.json: the table's corrected by timing the network, i.e. the
planner's confirmed side-by-side figure; for other rows ``call_ms + sum(layer ms) + node_ms * nodes``
from the same table, measured here, with any layer shape it lacks measured too), the table's prediction
alone, and the measured speed-up at batch 1, 1 and 2 threads. *Measured* is exactly what the planner
measures (``compressor.prune.latency.side_by_side``: the exported row and the exported dense network
timed side by side, rounds interleaved, the 25th percentile of every run (robust to the shared machine's
load; ``edge_runtime.layer_timing.NETWORK_QUANTILE``), in 3 sessions, the median pair's ratio), on the trained, exported networks (``export``'s graph), so measured / predicted is the planner's
error as a user who times both files would see it. Efficiency = measured speed-up (1 thread) /
(dense MACs / MACs).

Data: scikit-learn's digits upsampled (nearest) to 3×H×W; at 128×128 training and test sets are cut to
``--train-128``/``--test-128`` examples (CPU budget; accuracy there is a sanity figure only). The
torchvision-style net is a MobileNetV2-shaped one built here (torchvision is not installed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.studies.structured import digits_as, onnx_bytes  # noqa: E402
from compressor.config import config_for  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.pipeline import compress  # noqa: E402
from compressor.prune.channels import find_groups, full_plan, params_and_macs, shrink  # noqa: E402
from compressor.prune.examples import example_input  # noqa: E402
from compressor.prune.latency import LocalLatency, count_nodes, network_onnx, side_by_side  # noqa: E402
from compressor.train.data import TensorLoader  # noqa: E402
from compressor.train.models import build_model  # noqa: E402
from edge_runtime.layer_timing import LatencyTable, LayerShape, measure  # noqa: E402
from edge_runtime.safe_io import atomic_write_text  # noqa: E402

SPEEDUPS = (1.8, 2.5, 3.0)
DEFAULT_MACS = (0.5, 0.7)
UNIFORM = (0.75, 0.5)


# --- the torchvision-style net ------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 project; identity add at stride 1, same width."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.identity = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.identity else self.conv(x)


class SmallMobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 layout at width 0.5 (stages 16-24-32-64-96-160, head 640), 10 classes."""

    def __init__(self, size: int = 128) -> None:
        super().__init__()
        self.input_shape = (3, size, size)
        settings = [(1, 8, 1, 1), (6, 16, 2, 2), (6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1), (6, 80, 3, 2)]
        layers: List[nn.Module] = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
        cin = 16
        for expand, cout, repeat, stride in settings:
            for i in range(repeat):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, 640, 1, bias=False), nn.BatchNorm2d(640), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(640, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def make_model(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "mobilenetv2":
        return SmallMobileNetV2(size)
    model = build_model(name)
    model.input_shape = (3, size, size)  # resnet20 ends in a global pool: any size runs
    return model


# --- data, retraining, accuracy ------------------------------------------------------------------------
def data(shape: Tuple[int, ...], train_limit: Optional[int], test_limit: Optional[int]):
    train, test = digits_as(shape, 64, 0)
    if train_limit:
        train = TensorLoader(train.inputs[:train_limit], train.labels[:train_limit], 64, shuffle=True, seed=0)
    if test_limit:
        test = TensorLoader(test.inputs[:test_limit], test.labels[:test_limit], 256)
    return train, test


def retrain(model: nn.Module, train, epochs: int, lr: float) -> nn.Module:
    """The same budget as one of our levels: ``epochs`` over the training set, SGD with momentum."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(epochs):
        for inputs, labels in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, test) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for inputs, labels in test:
            right += int((model(inputs).argmax(1) == labels).sum())
            total += len(labels)
    return right / total


# --- predicted latency of any network ------------------------------------------------------------------
class Predictor:
    """``call_ms + sum(layer ms) + node_ms * nodes`` for any network from one table (measured shapes it lacks)."""

    def __init__(self, table: LatencyTable) -> None:
        self.table = table
        self.ms = dict(table.ms)

    def layer_shapes(self, model: nn.Module, example: torch.Tensor) -> List[LayerShape]:
        from compressor.prune.latency import _dense_shape

        shapes: List[LayerShape] = []
        hooks = [m.register_forward_hook(lambda m, args, out: shapes.append(
            _dense_shape(m, tuple(args[0].shape[2:]) if isinstance(m, nn.Conv2d) else ())))
            for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model.eval()(example)
        for hook in hooks:
            hook.remove()
        return shapes

    def predict(self, model: nn.Module, example: torch.Tensor) -> float:
        shapes = self.layer_shapes(model, example)
        missing = list({s.key(): s for s in shapes if s.key() not in self.ms}.values())
        if missing:
            self.ms.update(measure(missing, 1, 3, 10).ms)
        nodes = count_nodes(network_onnx(copy.deepcopy(model), example))
        return self.table.call_ms + sum(self.ms[s.key()] for s in shapes) + self.table.node_ms * nodes


# --- the rows -------------------------------------------------------------------------------------------
def ours(name: str, model_name: str, shape, table: Path, train, test, epochs: int, dense_state, scratch: Path,
         **config: Any) -> Dict[str, Any]:
    """One compress run (one-shot level from the shared dense state, ``epochs`` of lr-rewind retraining)."""
    preset = model_name if model_name == "resnet20" else "custom"
    model = make_model(model_name, shape[1])
    extra = {"latency_table": str(table)} if config.get("allocate", "global") != "global" or \
        "target_speedup" in config else {}
    cfg = config_for(preset, epochs=epochs, lr_drops=(), one_shot=True, batch_size=64, seed=0, **extra, **config)
    began = time.perf_counter()
    try:
        result = compress(model, train, test, cfg, out=scratch / name.replace(" ", "_"), device="cpu",
                          model_name=model_name if model_name == "resnet20" else None, data_name="digits",
                          pretrained=dense_state, latency_source=LocalLatency())
    except CompressorError as error:
        print(f"- {model_name}@{shape[1]} {name}: {error}", flush=True)
        return {"name": name, "error": str(error)}
    last = result.final()
    row = {k: last.get(k) for k in ("params", "macs", "accuracy", "predicted_speedup", "table_speedup",
                                    "measured_speedup", "blocks_removed")}
    row.update(name=name, model=result.model.cpu().eval(), seconds=time.perf_counter() - began)
    return row


def torch_pruning_rows(dense: nn.Module, example, round_to: int, train, test, epochs: int, lr: float,
                       exclude: nn.Module) -> Dict[str, Any]:
    """Torch-Pruning out of the box: MetaPruner, global L1, ``round_to``; the first ratio reaching 50% MACs."""
    import torch_pruning as tp

    _, dense_macs = params_and_macs(dense, example)
    for ratio in (0.25, 0.3, 0.35, 0.4, 0.45):
        model = copy.deepcopy(dense)
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=ratio, global_pruning=True, round_to=round_to,
                                      ignored_layers=[exclude(model)])
        pruner.step()
        if 1 - params_and_macs(model, example)[1] / dense_macs >= 0.5:
            break
    retrain(model, train, epochs, lr)
    return {"name": f"Torch-Pruning round_to {round_to} (ratio {ratio})", "model": model,
            "accuracy": accuracy(model, test)}


def uniform_row(dense: nn.Module, example, scale: float, train, test, epochs: int, lr: float) -> Dict[str, Any]:
    """Every channel group to ``scale`` of its width (multiple of 8), its strongest L1 channels kept."""
    from compressor.prune.channels import group_scores
    from compressor.prune.criteria import criterion_named

    model = copy.deepcopy(dense)
    groups = find_groups(model, example)
    scores = group_scores(model, groups, full_plan(groups), criterion_named(None, "channels"), example)
    kept = {}
    for g in groups:
        units = g.size // g.blocks
        keep = max(8, int(round(units * scale / 8)) * 8) if units > 8 else units
        strongest = torch.sort(scores[g.root].view(g.blocks, units).mean(0), descending=True, stable=True).indices
        positions = sorted(int(p) for p in strongest[:keep])
        kept[g.root] = [b * units + p for b in range(g.blocks) for p in positions]
    shrink(model, full_plan(groups), kept, example)
    retrain(model, train, epochs, lr)
    return {"name": f"uniform ×{scale:g}", "model": model, "accuracy": accuracy(model, test)}


def run_case(model_name: str, size: int, args, scratch: Path) -> Dict[str, Any]:
    shape = (3, size, size)
    example = example_input(shape)
    big = size >= 128
    train, test = data(shape, args.train_128 if big else None, args.test_128 if big else None)
    lr = 0.1 if model_name == "resnet20" else 0.05
    print(f"\n### {model_name} @ {size}x{size}: measuring the latency table", flush=True)
    from compressor.prune.latency import LatencyModel, DEFAULT_ROUNDING

    template = make_model(model_name, size)
    table_model = LatencyModel(template, example, find_groups(template, example), DEFAULT_ROUNDING["multiple"],
                               DEFAULT_ROUNDING["min_channels"])
    table = LocalLatency().table(table_model.shapes_needed(), "ort", 1)
    table_path = scratch / f"{model_name}-{size}-table.json"
    atomic_write_text(table_path, table.to_json())
    predictor = Predictor(table)
    # the dense network: trained once (--dense-epochs), every row starts from it
    dense = retrain(make_model(model_name, size), train, args.dense_epochs, lr)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    rows: List[Dict[str, Any]] = [{"name": "dense", "model": dense, "accuracy": accuracy(dense, test)}]
    print(f"  dense: {rows[0]['accuracy']:.1%}", flush=True)
    plan = [("default 50%", dict(structure="channels", target_macs=0.5))]
    plan += [("default 70%", dict(structure="channels", target_macs=0.7))]
    plan += [(f"--target-speedup {s:g} channels", dict(structure="channels", allocate="latency", target_speedup=s))
             for s in SPEEDUPS]
    plan += [(f"--target-speedup {s:g} channels,blocks", dict(structure="channels,blocks", allocate="latency",
                                                                target_speedup=s)) for s in SPEEDUPS]
    plan += [(f"--target-speedup {s:g} blocks", dict(structure="blocks", target_speedup=s)) for s in SPEEDUPS]
    only = [o for o in args.only.split(",") if o]
    for name, config in plan:
        if only and not any(o[1:] == name if o.startswith("=") else o in name for o in only):
            continue
        rows.append(ours(name, model_name, shape, table_path, train, test, args.epochs, dense_state, scratch,
                         **config))
        print(f"  {name}: {'refused' if 'error' in rows[-1] else 'done'}", flush=True)
    exclude = (lambda m: m.fc) if model_name == "resnet20" else (lambda m: m.classifier)
    for round_to in (8, 16) if not only else ():
        rows.append(torch_pruning_rows(dense, example, round_to, train, test, args.epochs, lr, exclude))
    for scale in UNIFORM if not only else ():
        rows.append(uniform_row(dense, example, scale, train, test, args.epochs, lr))
    return figures(model_name, size, rows, predictor, example, args)


def figures(model_name: str, size: int, rows: List[Dict[str, Any]], predictor: Predictor, example,
            args) -> Dict[str, Any]:
    """Times every row beside the dense network (the planner's ``side_by_side``), prints the table,
    returns the JSON rows."""
    shape = tuple(example.shape[1:])
    live = [r for r in rows if "model" in r]
    exported = [onnx_bytes(r["model"], shape) for r in live]
    source = LocalLatency(args.rounds, args.runs)
    threads = [int(t) for t in args.threads.split(",")]
    pairs = {t: [(1.0, 1.0)] + [side_by_side(source, exported[0], model, t) for model in exported[1:]]
             for t in threads}
    dense_params, dense_macs = params_and_macs(live[0]["model"], example)
    dense_pred = predictor.predict(live[0]["model"], example)
    out = []
    print(f"\n## {model_name} @ {size}x{size}: onnxruntime batch 1, speed-up vs dense (side by side, ratio of "
          f"p25 run times, median of 3 sessions), {args.epochs} epoch(s) retraining per row\n")
    print("| row | params | MACs | MACs removed | accuracy | predicted | table | planner measured | 1 thread: ms "
          "(speed-up) | measured / predicted | 2 threads | efficiency | blocks removed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for index, row in enumerate(live):
        params, macs = params_and_macs(row["model"], example)
        table = row.get("table_speedup") or dense_pred / predictor.predict(row["model"], example)
        predicted = row.get("predicted_speedup") or table
        speed = {t: pairs[t][index][0] / pairs[t][index][1] for t in threads}
        record = {"row": row["name"], "params": params, "macs": macs, "macs_removed": 1 - macs / dense_macs,
                  "accuracy": row.get("accuracy"), "predicted_speedup": predicted, "table_speedup": table,
                  "planned_measured_speedup": row.get("measured_speedup"),
                  "ms": {f"{t}t": pairs[t][index][1] for t in threads if index},
                  "dense_ms": {f"{t}t": pairs[t][index][0] for t in threads if index},
                  "speedup": {f"{t}t": speed[t] for t in threads}, "measured_over_predicted": speed[1] / predicted,
                  "efficiency": speed[1] / (dense_macs / macs), "blocks_removed": row.get("blocks_removed") or []}
        out.append(record)
        ms = f"{pairs[1][index][1]:.3f} " if index else ""
        print(f"| {row['name']} | {params:,} | {macs / 1e6:.2f} M | {record['macs_removed']:.1%} | "
              f"{100 * (row.get('accuracy') or 0):.1f}% | {predicted:.2f}× | {table:.2f}× | "
              f"{'%.2f×' % row['measured_speedup'] if row.get('measured_speedup') else '-'} | "
              f"{ms}({speed[1]:.2f}×) | {speed[1] / predicted - 1:+.1%} | "
              f"{'%.2f×' % speed[2] if 2 in speed else '-'} | "
              f"{record['efficiency']:.2f} | {len(record['blocks_removed'])} |", flush=True)
    for row in rows:
        if "error" in row:
            print(f"| {row['name']} | refused: {row['error'][:140]} |")
            out.append({"row": row["name"], "error": row["error"]})
    return {"model": model_name, "size": size, "rows": out}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="resnet20@32,resnet20@128,mobilenetv2@128")
    parser.add_argument("--epochs", type=int, default=1, help="retraining epochs per row")
    parser.add_argument("--train-128", type=int, default=96, help="training examples at 128x128 (CPU budget)")
    parser.add_argument("--test-128", type=int, default=128, help="test examples at 128x128")
    parser.add_argument("--dense-epochs", type=int, default=2, help="the dense network's training epochs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", default="", help="comma separated substrings: only our rows whose name has one "
                                                   "(and the dense), e.g. ' blocks'; '=NAME' matches NAME exactly")
    parser.add_argument("--threads", default="1,2", help="onnxruntime threads to measure with, comma separated")
    parser.add_argument("--json", default="prune_to_device.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine is shared
    import onnxruntime

    results: Dict[str, Any] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                               "load_before": os.getloadavg(), "cores": os.cpu_count(),
                               "epochs": args.epochs, "train_128": args.train_128, "test_128": args.test_128,
                               "rounds": args.rounds, "runs": args.runs, "cases": []}
    began = time.perf_counter()
    for case in args.cases.split(","):
        model_name, size = case.split("@")
        with tempfile.TemporaryDirectory(prefix="edgeprune-device-") as scratch:
            results["cases"].append(run_case(model_name, int(size), args, Path(scratch)))
        results["seconds"] = time.perf_counter() - began
        results["load_after"] = os.getloadavg()
        atomic_write_text(Path(args.json), json.dumps(results, indent=1) + "\n")
    print(f"\nJSON: {args.json} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
