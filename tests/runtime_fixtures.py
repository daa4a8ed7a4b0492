"""MODEL_DIRs for the runtime tests, built once with torch, or read prebuilt without torch.

``EDGEPRUNE_RUNTIME_FIXTURES=DIR`` points the tests at MODEL_DIRs built earlier with
``python -m tests.runtime_fixtures DIR`` (what tests/pinned_runtime.sh does, since its venv has no
torch). Each model NAME has ``DIR/NAME/`` (the MODEL_DIR), ``DIR/NAME.x.npy`` (a batch-of-2 test
input) and ``DIR/NAME.torch.npy`` (PyTorch's output for it).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

SPARSITY = 0.9
# name → (sparsity, values dtype). resnet20 at 90% stores its late layers as CSR and early ones dense.
MODELS = {
    "digits-mlp": (SPARSITY, "float32"),
    "digits-cnn": (SPARSITY, "float32"),
    "resnet20": (SPARSITY, "float32"),
    "residual-cnn": (0.8, "float32"),
    "mlp-block": (0.95, "float32"),
    "hardswish": (0.5, "float32"),
    "cumsum": (0.5, "float32"),
    "mobile-cnn": (0.6, "float32"),
    "digits-mlp-fp16": (SPARSITY, "float16"),
    "digits-mlp-int8": (SPARSITY, "float32"),   # + model.int8.onnx (export --quantize int8): dynamic
    "digits-cnn-int8": (SPARSITY, "float32"),   # static QDQ, calibrated on seeded noise
    # format 3 (compressor/export/compact.py): what `edgeprune export` writes by default
    "digits-mlp-compact": (SPARSITY, "float32"),
    "resnet20-compact": (0.95, "float32"),
    "digits-mlp-fp16-compact": (SPARSITY, "float16"),
    "digits-mlp-int8-compact": (SPARSITY, "float32"),
    "digits-cnn-int8-compact": (SPARSITY, "float32"),
}
ENV = "EDGEPRUNE_RUNTIME_FIXTURES"


def build_all(root: Path) -> Path:
    """Export every fixture model into ``root`` (needs torch and compressor)."""
    import torch

    from compressor.export.compact import compact_model_dir
    from compressor.export.model_dir import export_model
    from compressor.export.quantize import add_int8_variant
    from tests.runtime_models import make, prune_global

    root.mkdir(parents=True, exist_ok=True)
    for name, (sparsity, dtype) in MODELS.items():
        compact = name.endswith("-compact")
        base = name.replace("-compact", "")
        model = prune_global(make(base.replace("-fp16", "").replace("-int8", "")), sparsity)
        shape = tuple(model.input_shape)
        x = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
        export_model(model, root / name, input_shape=shape, values_dtype="float32" if compact else dtype,
                     force=True, source={"model": name, "test": True}, layout="external")
        if base.endswith("-int8"):
            add_int8_variant(root / name, data_spec=None, input_shape=shape, warn=lambda _: None)
        if compact:
            compact_model_dir(root / name, dtype)
        with torch.no_grad():
            np.save(root / f"{name}.torch.npy", model(torch.from_numpy(x)).numpy())
        np.save(root / f"{name}.x.npy", x)
    return root


@functools.lru_cache(maxsize=None)
def fixture_root() -> Path:
    """The fixtures' directory: prebuilt (env) or built now into a temp dir removed at exit."""
    prebuilt = os.environ.get(ENV)
    if prebuilt:
        return Path(prebuilt)
    root = Path(tempfile.mkdtemp(prefix="edgeprune-runtime-fixtures-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_all(root)


def model_dir(name: str) -> Path:
    return fixture_root() / name


def example_input(name: str) -> np.ndarray:
    return np.load(fixture_root() / f"{name}.x.npy")


def torch_output(name: str) -> np.ndarray:
    return np.load(fixture_root() / f"{name}.torch.npy")


def copy_model_dir(name: str, dest: Path) -> Path:
    """A private copy a test may damage."""
    target = dest / name
    shutil.copytree(model_dir(name), target, ignore=shutil.ignore_patterns("plans.json"))
    return target


if __name__ == "__main__":
    print(build_all(Path(sys.argv[1])))
