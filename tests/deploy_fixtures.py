"""Fixtures for the deploy tests: real MODEL_DIRs from the exporter, a device root with the runtime
installed once per session, and an in-process `edgeprune` runner.

The loopback "device" is this machine reached through a real sshd (tests/sshd.py); its Python is
this interpreter, whose site-packages already hold numpy/scipy/onnxruntime, so the runtime venv
(``--system-site-packages``) installs nothing from the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

from tests.sshd import SshdFactory, device_python


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def export_tiny_model(out_dir: Path, seed: int) -> Path:
    """A real MODEL_DIR: a small DigitsMLP with seeded weights, half of them pruned, via the exporter."""
    import torch

    from compressor.export.model_dir import export_model
    from compressor.train.models import DigitsMLP

    torch.manual_seed(seed)
    model = DigitsMLP(hidden=(32,))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_((parameter.abs() > parameter.abs().median()).float())
    export_model(model, out_dir, seed=seed)
    return out_dir


def break_smoke_sample(model_dir: Path) -> Path:
    """Make the manifest's expected output unreachable (atol < 0): checksums pass, the smoke test fails."""
    manifest_path = model_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sample"]["atol"] = -1.0
    manifest_path.write_text(json.dumps(manifest))
    return model_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> Dict[str, Path]:
    """``v1`` and ``v2`` (different weights) and ``bad_smoke`` (v2 whose smoke test cannot pass)."""
    base = tmp_path_factory.mktemp("models")
    dirs = {"v1": export_tiny_model(base / "v1", seed=1), "v2": export_tiny_model(base / "v2", seed=2)}
    dirs["bad_smoke"] = break_smoke_sample(Path(shutil.copytree(dirs["v2"], base / "bad_smoke")))
    return dirs


def modified_runtime_wheel(out_dir: Path, tag: str, formats: str = ""):
    """A runtime wheel built from a copy of edge_runtime whose ``__version__`` ends in ``+TAG``.

    Its content hash differs from this checkout's, so deploying it is a runtime upgrade, and
    ``python -m edge_runtime --version`` on the device tells which of the two runtimes runs.
    ``formats`` (e.g. ``"(2,)"``): the MODEL_DIR format versions that runtime reads instead of today's.
    """
    from deploy.wheel import build_runtime_wheel, runtime_source

    source = Path(shutil.copytree(runtime_source(), out_dir / "src" / "edge_runtime",
                                  ignore=shutil.ignore_patterns("__pycache__")))
    _replace(source / "__init__.py", '__version__ = "0.1.0"', f'__version__ = "0.1.0+{tag}"')
    if formats:
        path = source / "model_format.py"
        text, count = re.subn(r"^SUPPORTED_VERSIONS = \([^)]*\)", f"SUPPORTED_VERSIONS = {formats}",
                              path.read_text(), flags=re.M)
        assert count == 1, f"{path} no longer sets SUPPORTED_VERSIONS: update tests/deploy_fixtures.py"
        path.write_text(text)
    return build_runtime_wheel(out_dir / "wheel", source=source)


def with_format_version(model_dir: Path, out_dir: Path, version: int) -> Path:
    """A copy of MODEL_DIR whose manifest claims another ``format_version`` (files unchanged)."""
    copy = Path(shutil.copytree(model_dir, out_dir))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = version
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer contains {old!r}: update tests/deploy_fixtures.py"
    path.write_text(text.replace(old, new))


def make_legacy_device_root(root: Path, wheel, model_dir: Path, name: str) -> str:
    """The remote layout edgeprune wrote before versioned runtimes, built directly on this machine:
    a real ``venv`` folder with the runtime wheel, ``runtime.json`` at the root, and one release of
    ``model_dir`` current as ``name``. Returns the release id."""
    from deploy.model_dir import load_model_dir

    python = device_python()
    venv = root / "venv"
    subprocess.run([python, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", str(wheel.path)], check=True)
    (root / "runtime.json").write_text(json.dumps({
        "hash": wheel.content_hash, "version": wheel.version, "base_python": python,
        "python": str(venv / "bin" / "python"), "reported": "edge-runtime 0.1.0"}))
    release_id = load_model_dir(model_dir).release_id
    releases = root / "models" / name / "releases"
    releases.mkdir(parents=True)
    shutil.copytree(model_dir, releases / release_id, ignore=shutil.ignore_patterns("plans.json"))
    os.symlink(f"releases/{release_id}", root / "models" / name / "current")
    return release_id


def prepare_device_root(tmp_path_factory, label: str) -> Path:
    """A fresh remote root (with a space in its path, so quoting is exercised throughout) whose runtime
    runtime (``runtimes/ID/venv``, live as ``venv``) is installed through a throw-away sshd. Used once
    per session: the venv is the slow part."""
    from deploy.device import Device
    from deploy.ssh_config import HostSpec
    from deploy.runtime_install import ensure_runtime

    factory = SshdFactory(tmp_path_factory.mktemp(f"{label}-sshd-session"))
    root = tmp_path_factory.mktemp(label) / "edgeprune root"
    try:
        server = factory.start()
        with Device.connect(HostSpec.parse(server.spec), server.connect_options()) as device:
            ensure_runtime(device, python=device_python(), remote_root=str(root))
    finally:
        factory.stop_all()
    return root


@pytest.fixture(scope="session")
def device_root(tmp_path_factory) -> Path:
    """A remote root whose runtime venv is installed once for the session (tests add models to it)."""
    return prepare_device_root(tmp_path_factory, "device")


@pytest.fixture
def edgeprune(monkeypatch, tmp_path, capsys):
    """Run ``edgeprune ARGS`` in-process with HOME in a temp dir (the real ~/.ssh is never read)."""
    from edgeprune.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))

    def run(*args) -> CliResult:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def deploy_args(server, root: Path, *extra) -> List[str]:
    """The connection/device flags every deploy-side command in these tests takes."""
    return [*server.cli_args(), "--python", device_python(), "--remote-root", str(root), *extra]


def current_release(root: Path, name: str) -> str:
    """The release id ``models/NAME/current`` points at (read on the local filesystem)."""
    return Path(root, "models", name, "current").readlink().name


def tree_snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its mtime and size (links: their target): "changes nothing" checks."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = ("link", str(path.readlink()), path.lstat().st_mtime_ns)
        else:
            found[str(path)] = (path.stat().st_mtime_ns, path.stat().st_size)
    return found
