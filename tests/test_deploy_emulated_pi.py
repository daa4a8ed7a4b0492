"""Deploy to an emulated Raspberry Pi: Raspberry Pi OS 64-bit's own Python under qemu-aarch64.

The device Python is Debian 12 arm64's python3.11 with python3-numpy 1.24 and python3-scipy 1.10
(tests/emulated_pi/setup.sh unpacks them into a sysroot), reached through a real sshd; onnxruntime
comes from an offline wheelhouse (``--wheelhouse``), as on a Pi without internet. The runtime wheel is
the one deploy builds from this checkout. Run it alone with ``pytest -m emulated_pi``.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
from pathlib import Path

import pytest

from deploy.connection import Device, HostSpec

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
    # Printed last: the `edgeprune` fixture's capsys would swallow earlier prints (see them with -s).
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
