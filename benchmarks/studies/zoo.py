"""Real architectures through compress → export → runtime, with figures: the zoo benchmark.

    python3 benchmarks/studies/zoo.py                                   # every model importable here
    python3 benchmarks/studies/zoo.py --models resnet18,mobilenet_v2 --size 64 --json zoo.json

Each model (random weights: nothing is downloaded) is compressed for one epoch on small random data,
unstructured to 50% sparsity and structured (``--structure both``, the default) to 20% of the
parameters removed (one shot), exported as a MODEL_DIR, then opened in ``edge_runtime`` with each kernels
choice. Printed per model: whether each stage worked (or the one-line reason it did not), the largest
difference from PyTorch over every engine that ran, the p50 latency at batch 1 of the native engine
(best of sparse/dense kernels) and of onnxruntime (1 thread each), and the first-load time of
``kernels="auto"`` (tuning included, no cached plan).

torchvision and timm models need those packages; their PyPI wheels are built against a CUDA torch, so
on a CPU-only machine they live in their own venv, e.g.::

    python3 -m venv zoo-venv && zoo-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \\
        onnx onnxruntime numpy scipy scikit-learn tqdm matplotlib
    PYTHONPATH=$PWD zoo-venv/bin/python3 benchmarks/studies/zoo.py

Models whose package is missing are listed as skipped. Hugging Face models (tiny configs) need
``transformers``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from compressor.train.batches import call_model, pick_output
from compressor.config import PruneConfig
from compressor.export.model_dir import export_model
from compressor.pipeline import compress
from edge_runtime.safe_io import atomic_write_text

Builder = Callable[[int], Tuple[torch.nn.Module, Callable[[int, torch.Generator], Any]]]
CLASSES = 10
TORCHVISION = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
               "mnasnet0_5")
TIMM = ("ghostnet_050", "mobilevit_xxs", "vit_tiny_patch16_224")
# Hugging Face models from tiny configs (tests/zoo_models.py): name -> data factory there
HF = {"hf-bert": "text_data", "hf-distilbert": "text_data", "hf-vit": "image_data", "hf-gpt2": "text_data",
      "hf-bart": "eos_text_data", "hf-t5": "t5_text_data", "hf-wav2vec2": "audio_data",
      "hf-whisper_encoder": "mel_data", "hf-convnext": "image_data", "hf-levit": "levit_image_data"}
# built in code: a user CNN, a global-pooling CNN, the GRU/LSTM text classifiers, the registry's resnet20
OWN = ("user-cnn", "pooled-cnn", "gru-classifier", "lstm-classifier", "resnet20")


def _images(channels: int, size: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda batch, generator: torch.randn(batch, channels, size, size, generator=generator)


def _torchvision(name: str) -> Builder:
    def build(size: int):
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES), _images(3, size)
    return build


def _timm(name: str) -> Builder:
    def build(size: int):
        import timm

        extra = {"img_size": size} if name.startswith(("vit", "mobilevit")) else {}
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **extra), _images(3, size)
    return build


def _hf(name: str) -> Builder:
    def build(size: int):
        from tests import zoo_models

        model = getattr(zoo_models, name[len("hf-"):])()
        return model, _from_factory(getattr(zoo_models, HF[name]))
    return build


def _from_factory(factory: Callable) -> Callable[[int, torch.Generator], Any]:
    """``make(batch, generator)`` drawing examples from a zoo_models data factory's training batches."""
    pool = [inputs for inputs, _ in factory()[0]]

    def make(batch: int, generator: torch.Generator) -> Any:
        inputs = pool[int(torch.randint(0, len(pool), (1,), generator=generator))]
        if isinstance(inputs, dict):
            return {k: v[:batch] for k, v in inputs.items()}
        return inputs[:batch]
    return make


def _own(name: str) -> Builder:
    def build(size: int):
        from tests import zoo_models

        if name in ("user-cnn", "pooled-cnn"):
            return getattr(zoo_models, name.replace("-", "_"))(), _images(1, 8)
        if name in ("gru-classifier", "lstm-classifier"):
            return getattr(zoo_models, name.replace("-", "_"))(), _from_factory(zoo_models.ids_data)
        from compressor.train.models import build_model

        return build_model(name), _images(3, 32)
    return build


BUILDERS: Dict[str, Builder] = {
    **{n: _torchvision(n) for n in TORCHVISION}, **{n: _timm(n) for n in TIMM},
    **{n: _hf(n) for n in HF}, **{n: _own(n) for n in OWN},
}
PACKAGE = {**{n: "torchvision" for n in TORCHVISION}, **{n: "timm" for n in TIMM},
           **{n: "transformers" for n in HF}}
TARGETS = {"weights": 0.5, "channels": 0.2}  # channels: a fifth of the parameters (attention stays whole)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def _batches(make: Callable, count: int, batch: int, seed: int,
             classes: int = CLASSES) -> List[Tuple[Any, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(make(batch, generator), torch.randint(0, classes, (batch,), generator=generator))
            for _ in range(count)]


def _numpy(inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return {k: v.numpy() for k, v in inputs.items()}
    return inputs.numpy()


def _feed(session: Any, inputs: Any) -> Dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        return {arg.name: inputs[arg.name].numpy() for arg in session.get_inputs()}
    return {session.get_inputs()[0].name: inputs.numpy()}


def _p50_ms(fn: Callable[[], Any], seconds: float, min_runs: int = 10) -> float:
    fn()
    times: List[float] = []
    began = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_model(name: str, size: int, work: Path, seconds: float, structure: str = "weights") -> Dict[str, Any]:
    """Compress (``structure``: weights or channels), export and run one model; every stage records ok
    or its one-line failure."""
    from edge_runtime import InferenceSession
    from edge_runtime.errors import UnsupportedOpError

    row: Dict[str, Any] = {"model": name, "structure": structure}
    torch.manual_seed(0)
    try:
        model, make = BUILDERS[name](size)
    except ImportError as error:
        return {**row, "compress": f"skipped ({PACKAGE.get(name, '?')} not installed: {error.name})"}
    except Exception as error:
        return {**row, "compress": f"build failed: {_one_line(error)}"}
    row["params"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # labels in the model's own class count (the tiny HF heads have 3)
        classes = int(pick_output(call_model(model.eval(), make(2, torch.Generator().manual_seed(9))))[1].shape[-1])
    config = PruneConfig(epochs=1, target_sparsity=TARGETS[structure], one_shot=True, lr=0.01, batch_size=8,
                         structure=structure)
    began = time.perf_counter()
    try:
        result = compress(model, _batches(make, 2, 8, 0, classes), _batches(make, 1, 8, 1, classes), config,
                          out=work / "run")
        model = result.model  # structured: a new, smaller module
        row["level_params"] = sum(p.numel() for p in model.parameters())  # structured: what is physically left
        row["compress"] = f"ok {time.perf_counter() - began:.1f}s"
    except Exception as error:
        return {**row, "compress": _one_line(error)}
    model.eval()
    example = _batches(make, 1, 1, 2)[0][0]
    began = time.perf_counter()
    try:
        result = export_model(model, work / "model", sample=_numpy(example))
        row["export"] = f"ok {time.perf_counter() - began:.1f}s"
        row["size_kib"] = round(result.size_bytes / 1024, 1)
    except Exception as error:
        return {**row, "export": _one_line(error)}
    fresh = _batches(make, 1, 1, 3)[0][0]
    with torch.no_grad():
        expected = pick_output(call_model(model, fresh))[1].numpy()
    errors, latency, refused = [], {}, {}
    for kernels in ("sparse", "dense", "ort", "auto"):
        began = time.perf_counter()
        try:
            session = InferenceSession(work / "model", kernels=kernels, threads=1, retune=True)
        except UnsupportedOpError as error:
            refused[kernels] = str(error)
            continue
        load_s = time.perf_counter() - began
        try:
            feed = _feed(session, fresh)
            got = session.run(None, feed)[0]
            errors.append(float(np.max(np.abs(got.astype(np.float64) - expected))))
            if kernels == "auto":
                row["first_load_s"], row["auto_engine"] = round(load_s, 2), session.engine
            else:
                latency[kernels] = _p50_ms(lambda: session.run(None, feed), seconds)
        finally:
            session.close()
    native = [latency[k] for k in ("sparse", "dense") if k in latency]
    row["runtime"] = "native+ort" if native else f"ort only ({_missing(refused)})"
    row["max_error"] = max(errors) if errors else None
    row["output_scale"] = float(np.max(np.abs(expected)))  # an error only means something beside this
    row["native_ms"] = round(min(native), 3) if native else None
    row["ort_ms"] = round(latency["ort"], 3) if "ort" in latency else None
    return row


def _missing(refused: Dict[str, str]) -> str:
    """``native lacks Slice``: the op the native engines refused, from UnsupportedOpError's message."""
    message = next(iter(refused.values()), "")
    found = re.search(r"'([^']+)'", message)
    return f"native lacks {found.group(1)}" if found else message[:60]


def _error(row: Dict[str, Any]) -> str:
    if row.get("max_error") is None:
        return "—"
    return f"{row['max_error']:.2g} (of \\|y\\| ≤ {row['output_scale']:.2g})"


def _table(rows: List[Dict[str, Any]]) -> str:
    head = ("| model | structure | params (dense → level) | compress | export | runtime | max error vs PyTorch | native ms "
            "| onnxruntime ms | first load (auto) |")
    lines = [head, "|" + "---|" * 10]
    show = lambda v, fmt="{}": "—" if v is None else fmt.format(v)
    for r in rows:
        load = f"{r['first_load_s']} s → {r['auto_engine']}" if "first_load_s" in r else "—"
        params = show(r.get("params"), "{:,}")
        if r.get("level_params") not in (None, r.get("params")):
            params += f" → {r['level_params']:,}"
        lines.append(f"| {r['model']} | {r.get('structure', 'weights')} | {params} | {r.get('compress', '—')} | "
                     f"{r.get('export', '—')} | {r.get('runtime', '—')} | {_error(r)} | "
                     f"{show(r.get('native_ms'))} | {show(r.get('ort_ms'))} | {load} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BUILDERS), help="comma separated (default: all)")
    parser.add_argument("--size", type=int, default=64, help="image side for torchvision/timm models")
    parser.add_argument("--seconds", type=float, default=0.5, help="latency measuring time per engine")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--structure", choices=("weights", "channels", "both"), default="both",
                        help="unstructured (weights), structured (channels) or both (default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        if name not in BUILDERS:
            parser.error(f"unknown model {name!r}; known: {', '.join(BUILDERS)}")
        for structure in (("weights", "channels") if args.structure == "both" else (args.structure,)):
            with tempfile.TemporaryDirectory() as work:
                rows.append(run_model(name, args.size, Path(work), args.seconds, structure))
            print(f"{name}: {rows[-1]}", file=sys.stderr)
    print(_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
