"""Depthwise-heavy model through the edge runtime: native latency, onnxruntime latency, first load.

    python3 benchmarks/studies/depthwise_runtime.py [--runtime PATH] [--size 224] [--sparsity 0.5] [--out FILE]

Builds a MobileNetV2-shaped network by hand (torchvision is not needed: the same inverted-residual
blocks, 17 of them, widths 16…320, 1280 features, ReLU6, 224×224 input), prunes it by global
magnitude, exports a MODEL_DIR, then measures in a fresh process whose PYTHONPATH puts ``--runtime``'s
``edge_runtime`` first (so an older checkout can be measured the same way, for before/after):
first load with ``kernels="auto"`` and an empty plan cache (the tuning time), the batch-1 median
latency of the native program with dense and with sparse kernels, and of stock onnxruntime.
Prints a Markdown row and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[2]
BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_like(size: int) -> Any:
    """MobileNetV2's layer shapes (expansion, width, repeats, stride per stage), random weights."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Module:
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1, 1)] if expand != 1 else []
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, act=False)]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x) if self.residual else self.body(x)

    torch.manual_seed(0)
    layers, cin = [conv_bn(3, 32, 3, 2)], 32
    for expand, cout, repeats, stride in BLOCKS:
        for i in range(repeats):
            layers.append(Inverted(cin, cout, stride if i == 0 else 1, expand))
            cin = cout
    layers += [conv_bn(cin, 1280, 1, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    model = nn.Sequential(*layers).eval()
    model.input_shape = (3, size, size)
    return model


def export(size: int, sparsity: float, out: Path) -> Path:
    import torch
    from torch import nn

    from compressor.export.model_dir import export_model
    model = mobilenet_like(size)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if sparsity > 0:
        threshold = torch.cat([w.detach().abs().flatten() for w in weights]).quantile(sparsity)
        with torch.no_grad():
            for w in weights:
                w.mul_((w.abs() > threshold).to(w.dtype))
    export_model(model, out, force=True, source={"model": "mobilenet-like", "benchmark": True})
    return out


CHILD = r"""
import json, sys, time
import numpy as np
import edge_runtime
from edge_runtime import InferenceSession

model_dir, runs = sys.argv[1], int(sys.argv[2])
def latency(session):
    x = np.random.default_rng(0).standard_normal([1] + session.get_inputs()[0].shape[1:]).astype(np.float32)
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter(); session.run(None, feed); times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]
start = time.perf_counter()
auto = InferenceSession(model_dir, kernels="auto", threads=1, retune=True)
first_load = time.perf_counter() - start
result = {"runtime": edge_runtime.__file__, "first_load_s": first_load, "auto_engine": auto.engine,
          "auto_reason": auto.plan.get("reason")}
for kernels in ("dense", "sparse", "ort"):
    result[kernels + "_ms"] = latency(InferenceSession(model_dir, kernels=kernels, threads=1))
print(json.dumps(result))
"""


def measure(model_dir: Path, runtime: Path, runs: int) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(runtime), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(runs)], env=env, check=True,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default=str(REPO), help="folder holding the edge_runtime to measure")
    parser.add_argument("--model-dir", help="reuse this MODEL_DIR (exported when missing)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default="depthwise_runtime.json")
    args = parser.parse_args()
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="edgeprune-mobilenet-"))
    if not (model_dir / "manifest.json").exists():
        export(args.size, args.sparsity, model_dir)
    (model_dir / "plans.json").unlink(missing_ok=True)
    result = measure(model_dir, Path(args.runtime), args.runs)
    result.update(size=args.size, sparsity=args.sparsity, model_dir=str(model_dir))
    print("| runtime | native dense ms | native sparse ms | onnxruntime ms | first load (auto) s | auto engine |")
    print("|---|---:|---:|---:|---:|---|")
    print(f"| {args.runtime} | {result['dense_ms']:.1f} | {result['sparse_ms']:.1f} | {result['ort_ms']:.1f} | "
          f"{result['first_load_s']:.1f} | {result['auto_engine']} |")
    from edge_runtime.safe_io import atomic_write_text

    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
