"""Shared helpers for the compressor tests: tiny real runs on the digits data."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from compressor.config import PruneConfig
from compressor.train.data import load_data
from compressor.train.models import build_model, input_shape_of
from compressor.pipeline import CompressResult, compress

REPO = Path(__file__).resolve().parent.parent

# Small enough to run in a second or two, big enough to exercise every level transition:
# densities 0.8, 0.64, 0.512 and then exactly the target 0.45 (sparsity 0.55).
TINY = dict(epochs=3, batch_size=64, lr=0.1, lr_drops=(2,), target_sparsity=0.55, rewind_epoch=1, seed=3)
TINY_ARGS = ["--epochs", "3", "--lr-drops", "2", "--target-sparsity", "0.55", "--rewind-epoch", "1",
             "--seed", "3", "--no-progress"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: tiny models gain nothing from more, and on a loaded 2-core CI machine
    torch's spinning worker threads make them ~10x slower. Subprocesses get OMP_NUM_THREADS=1 (see
    ``ENV``), so in-process and subprocess runs compute bit-identical results."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def tiny_config(**overrides: Any) -> PruneConfig:
    return PruneConfig(**{**TINY, **overrides})


def run_tiny(out: Optional[Path], model_name: str = "digits-mlp", resume: bool = False,
             epoch_callback=None, latency_source=None, progress: Optional[bool] = False,
             **overrides: Any) -> CompressResult:
    """A real compression run on the digits, built exactly as the CLI builds it (silent unless asked:
    tests that read stderr must not see another run's progress lines)."""
    config = tiny_config(**overrides)
    torch.manual_seed(config.seed)
    model = build_model(model_name)
    train_loader, test_loader = load_data("digits", input_shape_of(model), config.batch_size, config.seed)
    with one_thread():
        return compress(model, train_loader, test_loader, config, out=out, resume=resume, device="cpu",
                        model_name=model_name, data_name="digits", epoch_callback=epoch_callback,
                        latency_source=latency_source, progress=progress)


TEMP_ROOT = Path(tempfile.mkdtemp(prefix="edgeprune-compressor-tests-"))
atexit.register(shutil.rmtree, TEMP_ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def shared_run() -> Path:
    """One finished three-method run that several read-only tests inspect (built once per session)."""
    out = TEMP_ROOT / "three-methods"
    run_tiny(out, methods=("lr-rewind", "finetune", "weight-rewind"))
    return out


def final(run_dir: Path, method: str, level: int) -> Dict[str, Any]:
    """A level's final.pt contents."""
    path = run_dir / "dense" / "final.pt" if level == 0 else run_dir / method / f"level_{level}" / "final.pt"
    return torch.load(path, weights_only=True)


def strip_seconds(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """metrics.json without wall times, which legitimately differ between runs."""
    return {**metrics, "methods": {m: [{k: v for k, v in e.items() if k != "seconds"} for e in levels]
                                   for m, levels in metrics["methods"].items()}}


_KILLED_AT = """
import os, signal, sys
method, level, epoch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.argv = ["edgeprune", "compress", *sys.argv[4:]]
import compressor.pipeline as pipeline
real = pipeline.compress
def killing(*args, **kwargs):
    def kill(*where):
        if where == (method, level, epoch):
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **{**kwargs, "epoch_callback": kill})  # instead of the CLI's progress lines
pipeline.compress = killing
from edgeprune.cli import main
sys.exit(main())
"""


def compress_killed_at(args: List[str], method: str, level: int, epoch: int,
                       timeout: float = 120) -> subprocess.CompletedProcess:
    """A real `edgeprune compress ARGS` process SIGKILLed right after the checkpoint of
    ``(method, level, epoch)``: what a crash or an OOM kill leaves behind for ``--resume``."""
    return subprocess.run([sys.executable, "-c", _KILLED_AT, method, str(level), str(epoch), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_same_channel_runs(out: Path, reference: Path) -> None:
    """Two structured RUN_DIRs (a killed-and-resumed one, an uninterrupted one) hold the same metrics and,
    at every level, the same weights and kept-channel indices, bit for bit."""
    import torch

    a, b = json.loads((out / "metrics.json").read_text()), json.loads((reference / "metrics.json").read_text())
    assert strip_seconds(a) == strip_seconds(b)
    for method, levels in a["methods"].items():
        for entry in levels:
            fa, fb = final(out, method, entry["level"]), final(reference, method, entry["level"])
            assert all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"]), (method, entry["level"])
            assert all(torch.equal(fa["channels"][k], fb["channels"][k]) for k in fa["channels"])
    assert len(a["methods"]["weight-rewind"]) >= 3  # the kill really hit a level that was then resumed


def cli(args: List[str], timeout: float = 120) -> Tuple[int, str, str]:
    """Run the real ``edgeprune`` command in a subprocess; ``(exit code, stdout, stderr)``."""
    proc = subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=ENV)
    return proc.returncode, proc.stdout, proc.stderr


def tree_snapshot(folder: Path) -> Dict[str, bytes]:
    """Every file's bytes under ``folder``, to prove a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
