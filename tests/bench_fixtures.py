"""Fixtures for the `edgeprune bench` tests: real MODEL_DIRs, fast sweep flags, process helpers.

Models are exported by the real exporter from a digits MLP pruned by magnitude at 0% and 90%; the
benchmark processes are the real `python -m edge_runtime bench`. To make one configuration hang or
crash on purpose, a ``--python`` wrapper script runs the real interpreter for everything except the
benchmark of a model whose folder is named ``hang-me`` (it sleeps) — a real process that really
hangs, so the harness's timeout and clean-up are what is tested.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

HANGING = "time.sleep(600)"  # in the command line of the benchmark that hangs on purpose (and of nothing else)

# A configuration measured in a few hundred milliseconds: enough to check figures are consistent.
FAST = ["--warmup", "2", "--iters", "20", "--min-seconds", "0"]


def export_pruned_mlp(out_dir: Path, sparsity: float, accuracy: float, seed: int = 0, hidden=(64,),
                      quantize: bool = False) -> Path:
    """A real MODEL_DIR: a digits MLP with the smallest ``sparsity`` of each weight matrix zeroed; with
    ``quantize``, as `export --quantize int8` writes it (int8 weights stored once, model.int8.onnx)."""
    import torch

    from compressor.export.model_dir import export_model
    from compressor.train.models import DigitsMLP

    torch.manual_seed(seed)
    model = DigitsMLP(hidden=hidden)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2 and sparsity > 0:
                threshold = parameter.abs().flatten().kthvalue(int(sparsity * parameter.numel())).values
                parameter[parameter.abs() <= threshold] = 0.0
    export_model(model, out_dir, accuracy=accuracy, source={"method": "magnitude", "level": int(sparsity * 100)},
                 layout="external" if quantize else "compact")
    if quantize:
        from compressor.export.compact import compact_model_dir
        from compressor.export.quantize import add_int8_variant

        add_int8_variant(out_dir, data_spec=None, input_shape=(64,), warn=lambda _: None)
        compact_model_dir(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory) -> Dict[str, Path]:
    """``dense`` (0%, accuracy 0.95) and ``sparse90`` (90%, accuracy 0.93), plus ``hang-me``/``broken``."""
    import shutil

    base = tmp_path_factory.mktemp("bench-models")
    models = {"dense": export_pruned_mlp(base / "dense", 0.0, 0.95),
              "sparse90": export_pruned_mlp(base / "sparse90", 0.9, 0.93)}
    models["hang-me"] = Path(shutil.copytree(models["sparse90"], base / "hang-me"))
    # Truncated weights: the manifest and file list look fine, the runtime fails to load it.
    broken = Path(shutil.copytree(models["sparse90"], base / "broken"))
    weights = broken / "weights.npz"
    weights.write_bytes(weights.read_bytes()[:200])
    models["broken"] = broken
    return models


@pytest.fixture
def hanging_python(tmp_path) -> Path:
    """A ``--python`` that is this interpreter, except that benchmarking ``hang-me`` sleeps for 10 min.

    The sleeping process keeps the model's path in its command line, so tests can find it.
    """
    script = tmp_path / "python-with-hang"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "edge_runtime" ]; then
  case "$4" in *hang-me*) exec {sys.executable} -c "import time; {HANGING}" "$4" ;; esac
fi
exec {sys.executable} "$@"
""")
    script.chmod(0o755)
    return script


@pytest.fixture
def fake_vcgencmd(tmp_path, monkeypatch) -> Path:
    """A ``vcgencmd`` on PATH answering like a hot, throttling Raspberry Pi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "vcgencmd"
    script.write_text("""#!/bin/sh
case "$1" in
  get_throttled) echo "throttled=0x50005" ;;
  measure_temp) echo "temp=83.5'C" ;;
  *) exit 1 ;;
esac
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def read_results(out_dir: Path) -> dict:
    """results.json as a dict."""
    return json.loads((out_dir / "results.json").read_text())


def processes_matching(text: str, exclude: str = "\0") -> List[int]:
    """Pids whose command line contains ``text`` but not ``exclude`` (to prove nothing was left running)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and exclude not in cmdline:
                found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll ``condition()`` until it is true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def kill_leftovers(text: str) -> None:
    """Clean up after a failed test so later tests don't inherit a sleeping process."""
    for pid in processes_matching(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def bench_cli(monkeypatch, tmp_path, capsys):
    """Run ``edgeprune bench ARGS`` in-process (HOME in a temp dir: the real ~/.ssh is never read)."""
    from edgeprune.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))

    def run(*args):
        capsys.readouterr()
        code = main(["bench", *[str(arg) for arg in args]])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def bench_device_root(tmp_path_factory) -> Path:
    """A remote root with the runtime installed once per session, shared by the SSH bench tests.

    Several loopback "hosts" are the same machine, so without this they would race to create one
    venv; a real fleet has one disk per device.
    """
    from tests.deploy_fixtures import prepare_device_root

    return prepare_device_root(tmp_path_factory, "bench-device")


def ssh_args(server, root: Path) -> List[str]:
    """Connection and device flags for a loopback sshd (never the real ~/.ssh/config)."""
    from tests.sshd import device_python

    return [*server.cli_args(), "-F", "/dev/null", "--python", device_python(), "--remote-root", str(root)]
