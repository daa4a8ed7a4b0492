"""edge_runtime loads and runs a MODEL_DIR with torch, compressor, deploy and onnx unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.runtime_fixtures import example_input, model_dir

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "compressor", "deploy", "onnx", "benchmarks", "edgeprune")

BLOCKER = f"""
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked for this test: {{name}}")
        return None
sys.meta_path.insert(0, Blocker())
"""

SCRIPT = """
import sys, numpy as np
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the blocker failed: torch imported")
import edge_runtime
from edge_runtime.cli import main
x = np.load(sys.argv[2])
for kernels in ("auto", "sparse", "dense", "ort"):
    session = edge_runtime.InferenceSession(sys.argv[1], kernels=kernels, threads=2)
    session.run(None, {"input": x})
assert main(["check", sys.argv[1], "--kernels", "sparse"]) == 0
assert main(["bench", sys.argv[1], "--iters", "3", "--min-seconds", "0", "--json"]) == 0
bad = [name for name in sys.modules if name.split(".")[0] in %r]
assert not bad, bad
print("TORCH-FREE OK")
""" % (BLOCKED,)


def test_runtime_works_with_torch_unimportable(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    np_input = tmp_path / "x.npy"
    import numpy as np

    np.save(np_input, example_input("resnet20"))
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir("resnet20")), str(np_input)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TORCH-FREE OK" in done.stdout
