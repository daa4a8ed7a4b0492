"""Deploy to an emulated Raspberry Pi: Raspberry Pi OS 64-bit's own Python under qemu-aarch64.

The device Python is Debian 12 arm64's python3.11 with python3-numpy 1.24 and python3-scipy 1.10
(tests/emulated_pi/setup.sh unpacks them into a sysroot), reached through a real sshd; onnxruntime
comes from an offline wheelhouse (``--wheelhouse``), as on a Pi without internet. The runtime wheel is
the one deploy builds from this checkout. Run it alone with ``pytest -m emulated_pi``.

The same device then runs int8 variants (``edgeprune export --quantize int8``): a dynamic-int8 MLP and
a static QDQ CNN, i.e. onnxruntime's aarch64 int8 kernels under Debian 12's numpy. Everything goes through
the public commands (export, deploy, edge-runtime check/tune/run/info), never the MODEL_DIR's files, so
the test holds whatever the format stores where.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deploy.device import Device
from deploy.ssh_config import HostSpec
from edge_runtime.cli import PLAIN_CHECK_TOLERANCE
from edge_runtime.cli import main as edge_runtime_main

pytestmark = [pytest.mark.emulated_pi, pytest.mark.sshd, pytest.mark.slow]

SETUP = Path(__file__).parent / "emulated_pi" / "setup.sh"
CACHE = Path(os.environ.get("EDGEPRUNE_EMUPI_CACHE", "/var/cache/edgeprune-emupi"))


@pytest.fixture(scope="module")
def pi_python() -> str:
    """The sysroot's python wrapper (setup.sh is idempotent and cached); fails under CI=true, else skips."""
    done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        message = f"emulated Pi setup failed: {done.stderr.strip()[-2000:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return done.stdout.strip().splitlines()[-1]


def test_deploy_smoke_and_bench_on_emulated_pi(pi_python, sshd, model_dirs, edgeprune, tmp_path):
    root = tmp_path / "pi home" / ".edgeprune"
    flags = [*sshd.cli_args(), "--python", pi_python, "--remote-root", root]
    deployed = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", "digits", "--wheelhouse",
                         CACHE / "wheelhouse", *flags)
    assert deployed.code == 0, deployed.err
    assert "aarch64, Python 3.11" in deployed.out and "numpy 1.24" in deployed.out
    assert "smoke test:" in deployed.out

    again = edgeprune("deploy", sshd.spec, model_dirs["v1"], "--name", "digits", "--wheelhouse",
                      CACHE / "wheelhouse", *flags)
    assert again.code == 0 and "nothing to do" in again.out, again.err

    venv_python = posixpath.join(str(root), "venv", "bin", "python")
    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        facts = json.loads(device.run([venv_python, "-c", (
            "import json, platform, numpy, scipy, onnxruntime, edge_runtime; print(json.dumps({"
            "'machine': platform.machine(), 'python': platform.python_version(), 'numpy': numpy.__version__, "
            "'scipy': scipy.__version__, 'onnxruntime': onnxruntime.__version__, "
            "'edge_runtime': edge_runtime.__file__}))")], timeout=600).stdout)

    # A one-level sweep through the real harness: the deployed model, by name, under stock onnxruntime
    # and the sparse kernels, each configuration in its own process on the emulated Pi.
    out = tmp_path / "bench"
    bench = edgeprune("bench", sshd.spec, "digits", "--kernels", "ort,sparse", "--warmup", "1", "--iters", "5",
                      "--min-seconds", "0", "--out", out, *flags)
    # Printed here and at the end: each `edgeprune` call's capsys swallows earlier prints (see them with -s).
    print(deployed.out, again.out, json.dumps(facts), bench.out, sep="\n")
    assert facts["machine"] == "aarch64"
    assert facts["numpy"].startswith("1.24.") and facts["scipy"].startswith("1.10.")
    assert facts["edge_runtime"].startswith(str(root))  # the wheel deploy built, in the device's venv
    assert bench.code == 0, bench.err
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["results"]] == ["ok", "ok"]
    assert {r["bench"]["kernels"] for r in results["results"]} == {"ort", "sparse"}
    facts_before = results["hosts"][sshd.spec]["facts_before"]
    assert facts_before["machine"] == "aarch64"
    # The sysroot's Pi-style /proc/cpuinfo, as a Pi without a mounted device tree reports itself.
    assert facts_before["board"].startswith("Raspberry Pi 4") and facts_before["cpu"] == "Arm Cortex-A72"
    assert "| digits |" in (out / "report.md").read_text()

    # int8 variants on the same device and runtime (installed above: only the models are new)
    with Device.connect(HostSpec.parse(sshd.spec), sshd.connect_options()) as device:
        int8_logs = [int8_variant_runs_on_the_pi(model, shape, edgeprune, device, sshd.spec, venv_python, root,
                                                 flags, tmp_path)
                     for model, shape in (("digits-mlp", (8, 64)), ("digits-cnn", (8, 1, 8, 8)))]
    print(*int8_logs, sep="\n")


def pruned_checkpoint(model: str, path: Path) -> Path:
    """A built-in model with seeded weights, 80% of each layer's weights pruned by magnitude (per layer,
    so every layer keeps some: the output depends on the input), saved as a plain state_dict."""
    import torch

    from compressor.train.models import build_model

    torch.manual_seed(0)
    net = build_model(model)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.dim() > 1:
                parameter.mul_((parameter.abs() > parameter.abs().flatten().quantile(0.8)).float())
    torch.save(net.state_dict(), path)
    return path


def relative_diff(got: np.ndarray, reference: np.ndarray) -> float:
    """Max abs difference over the output's magnitude (at least 1): edge-runtime check's rule for plain files."""
    assert got.shape == reference.shape
    scale = max(1.0, float(np.max(np.abs(reference))))
    return float(np.max(np.abs(got.astype(np.float64) - reference))) / scale


def workstation_run(model_dir: Path, kernels: str, inputs: Path, out: Path) -> np.ndarray:
    """``edge-runtime run`` on this machine (x86-64, its own onnxruntime): the reference output."""
    assert edge_runtime_main(["run", str(model_dir), "--kernels", kernels, "--input", str(inputs),
                              "--out", str(out)]) == 0
    with np.load(out) as outputs:
        return outputs[outputs.files[0]]


def int8_variant_runs_on_the_pi(model: str, shape: tuple, edgeprune, device, spec: str, venv_python: str,
                                root: Path, flags: list, tmp_path: Path) -> str:
    """Export MODEL with an int8 variant, deploy it, and on the emulated Pi: check it against the int8
    variant's recorded sample, tune ``auto`` over native/ort/ort-int8, and run both; outputs match
    onnxruntime on this workstation running the same variant (or the engine ``auto`` chose).
    Returns what the device said, for the log."""
    name, work = f"{model}-int8", tmp_path / f"{model}-int8"
    work.mkdir()
    model_dir = work / "model"
    exported = edgeprune("export", "--model", model, "--checkpoint", pruned_checkpoint(model, work / "ckpt.pt"),
                         "--out", model_dir, "--quantize", "int8")
    assert exported.code == 0 and "int8 variant" in exported.out, exported.err
    deployed = edgeprune("deploy", spec, model_dir, "--name", name, "--wheelhouse",
                         CACHE / "wheelhouse", *flags)
    assert deployed.code == 0 and "smoke test: ok" in deployed.out, deployed.err
    current = posixpath.join(str(root), "models", name, "current")
    edge = lambda *args: device.run([venv_python, "-m", "edge_runtime", *args], timeout=600).stdout

    checked = edge("check", current, "--kernels", "ort-int8")
    assert "sample matches" in checked and "engine ort-int8, variant int8" in checked, checked
    plan = json.loads(edge("tune", current, "--json"))
    # auto timed every engine the MODEL_DIR holds on the device (native too, if not given up as far
    # behind), and kept one of them; which one is the device's business
    assert {"ort", "ort-int8"} <= set(plan["engine_ms"]) and plan["engine"] in plan["engine_ms"], plan
    info = edge("info", current)
    assert re.search(r"^plan \((\d+) threads\): engine ([\w-]+)", info, re.M).groups() == (
        str(plan["threads"]), plan["engine"]), info  # info shows the plan auto keeps, cached on the device
    assert re.search(r"^variant int8 ", info, re.M), info

    # The loopback "device" shares this machine's filesystem: inputs and outputs are passed by path.
    inputs = work / "inputs.npy"
    np.save(inputs, np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    for kernels in ("ort-int8", "auto"):
        edge("run", current, "--kernels", kernels, "--input", str(inputs), "--out", str(work / f"pi-{kernels}.npz"))
    with np.load(work / "pi-ort-int8.npz") as pi_int8, np.load(work / "pi-auto.npz") as pi_auto:
        got_int8, got_auto = pi_int8[pi_int8.files[0]], pi_auto[pi_auto.files[0]]
    reference = workstation_run(model_dir, "ort-int8", inputs, work / "ws-int8.npz")
    assert float(np.ptp(reference, axis=0).max()) > 0  # the inputs give different outputs: a real comparison
    assert relative_diff(got_int8, reference) <= PLAIN_CHECK_TOLERANCE
    # auto's output is its engine's: the int8 variant's, or the fp32 model's (native and ort agree to 1e-4)
    auto_reference = reference if plan["engine"] == "ort-int8" else workstation_run(
        model_dir, "ort", inputs, work / "ws-fp32.npz")
    assert relative_diff(got_auto, auto_reference) <= PLAIN_CHECK_TOLERANCE
    return "\n".join([deployed.out, checked, json.dumps({k: plan.get(k) for k in ("engine", "engine_ms")}), info])
