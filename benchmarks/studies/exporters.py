"""torch's two ONNX exporters side by side: TorchScript (``dynamo=False``, what export uses) and dynamo
(``dynamo=True``, torch's default since 2.9; needs ``onnxscript``).

    PYTHONPATH=$PWD python3 benchmarks/studies/exporters.py [--json exporters.json]

Per model and exporter: export seconds, file bytes (model.onnx plus any external ``.data``), node
count, op types, onnxruntime p50 at batch 1 (1 thread), max difference from PyTorch, and whether
``edge_runtime.InferenceSession(path, kernels="ort")`` loads the plain file. Random weights, no downloads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edge_runtime.safe_io import atomic_write_text

MODELS: Dict[str, Callable[[], Tuple[torch.nn.Module, Dict[str, torch.Tensor]]]] = {}


def _register(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn
    return wrap


@_register("digits-mlp")
def _mlp():
    from compressor.train.models import build_model
    return build_model("digits-mlp"), {"input": torch.randn(2, 64)}


@_register("resnet20")
def _resnet20():
    from compressor.train.models import build_model
    return build_model("resnet20"), {"input": torch.randn(2, 3, 32, 32)}


@_register("hf-bert")
def _bert():
    from tests import zoo_models
    return zoo_models.bert(), zoo_models._text(2, torch.Generator().manual_seed(0))


@_register("hf-convnext")
def _convnext():
    from tests import zoo_models
    return zoo_models.convnext(), {"pixel_values": torch.randn(2, 3, 16, 16)}


@_register("gru-classifier")
def _gru():
    from tests import zoo_models
    return zoo_models.gru_classifier(), {"input_ids": torch.randint(0, zoo_models.VOCAB, (2, zoo_models.SEQ))}


def _first_tensor(output: Any) -> torch.Tensor:
    from compressor.train.batches import pick_output
    return pick_output(output)[1]


def _logits_only(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` whose forward returns its logits only (both exporters then see one output); the
    signature stays the forward's, so keyword inputs keep their names."""
    import functools

    original = model.forward

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _first_tensor(original(*args, **kwargs))

    model.forward = forward
    return model


def _p50_ms(session: ort.InferenceSession, feed: Dict[str, np.ndarray], runs: int = 30) -> float:
    session.run(None, feed)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        session.run(None, feed)
        times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def measure(name: str, dynamo: bool, work: Path) -> Dict[str, Any]:
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False
    wrapped = _logits_only(model.eval())
    single = list(inputs) == ["input"]
    args, kwargs = ((inputs["input"],), None) if single else ((), dict(inputs))
    path = work / f"{name}-{'dynamo' if dynamo else 'torchscript'}.onnx"
    row: Dict[str, Any] = {"model": name, "exporter": "dynamo" if dynamo else "torchscript"}
    began = time.perf_counter()
    try:
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=64)
            shapes = ({0: batch},) if single else {k: {0: batch} for k in inputs}
            torch.onnx.export(wrapped, args, str(path), kwargs=kwargs, dynamo=True, output_names=["logits"],
                              dynamic_shapes=shapes)
        else:
            axes = {k: {0: "batch"} for k in [*inputs, "logits"]}
            torch.onnx.export(wrapped, args, str(path), kwargs=kwargs, dynamo=False, opset_version=17,
                              input_names=list(inputs), output_names=["logits"], dynamic_axes=axes)
    except Exception as error:
        lines = [line for line in str(error).splitlines() if "Error" in line or "error" in line]
        return {**row, "error": f"{type(error).__name__}: {(lines or [''])[-1].strip()[:150]}"}
    row["export_s"] = round(time.perf_counter() - began, 2)
    row["bytes"] = sum(p.stat().st_size for p in work.glob(path.name + "*"))
    graph = onnx.load(str(path), load_external_data=False).graph
    row["nodes"] = len(graph.node)
    row["ops"] = sorted({n.op_type for n in graph.node})
    row["external_data"] = (work / (path.name + ".data")).exists()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]  # dynamo names a single input after the forward's parameter
    feed = dict(zip(names, (v[:1].numpy() for v in inputs.values()))) if single else \
        {k: v[:1].numpy() for k, v in inputs.items() if k in names}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        expected = (wrapped(inputs["input"][:1]) if single else wrapped(**{k: v[:1] for k, v in inputs.items()})).numpy()
    row["max_diff"] = float(np.max(np.abs(got - expected)))
    row["ort_p50_ms"] = round(_p50_ms(session, feed), 3)
    try:
        from edge_runtime import InferenceSession

        InferenceSession(path, kernels="ort", threads=1).close()
        row["edge_runtime_loads"] = "yes"
    except Exception as error:
        row["edge_runtime_loads"] = f"no ({str(error).splitlines()[0][:70]})"
    return row


def _table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| model | exporter | export s | bytes | nodes | ort p50 ms | max diff | edge_runtime (ort) loads |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['exporter']} | {r['export_s']} | {r['bytes']:,} | {r['nodes']} | "
                     f"{r['ort_p50_ms']} | {r['max_diff']:.2g} | {r['edge_runtime_loads']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models.split(","):
            for dynamo in (False, True):
                rows.append(measure(name, dynamo, Path(work)))
                print(rows[-1], file=sys.stderr)
    print(_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
