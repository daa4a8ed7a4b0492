"""Versioned runtimes: a runtime upgrade goes live only after the smoke test, like a release.

Real sshd, real venvs on the loopback "device", real runtime wheels: this checkout's, and ones built
from a copy of edge_runtime with another ``__version__`` (a different content hash: an upgrade).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deploy.device import Device
from deploy.ssh_config import HostSpec
from deploy.errors import ReleaseError
from deploy.model_dir import load_model_dir
from deploy.preflight import probe, runtime_is_current
from deploy.rollout import DeploySettings, deploy_to_host
from deploy.runtime_install import runtime_id
from deploy.wheel import build_runtime_wheel
from tests.deploy_fixtures import (current_release, deploy_args, make_legacy_device_root, modified_runtime_wheel, with_format_version)
from tests.sshd import device_python

pytestmark = pytest.mark.sshd


def _live(root: Path) -> Path:
    """Where ``venv`` links to, relative to the root (``runtimes/ID/venv``)."""
    return (root / "venv").readlink()


def _runs(root: Path, *args: str) -> str:
    """Run ``ROOT/venv/bin/python -m edge_runtime ARGS`` (the live runtime, as the bench harness does).

    Not from the checkout's folder: ``-m`` puts the working directory first on sys.path."""
    done = subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "edge_runtime", *args],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _runtimes(root: Path) -> list:
    return sorted(path.name for path in (root / "runtimes").iterdir())


def _settings(server, root: Path, name: str) -> DeploySettings:
    return DeploySettings(name=name, connect=server.connect_options(), python=device_python(),
                          remote_root=str(root))


@pytest.mark.slow  # ~25 s: builds two runtime venvs on the device
def test_runtime_upgrade_goes_live_only_after_the_smoke_test(sshd, model_dirs, tmp_path):
    root = tmp_path / "device root"
    settings = _settings(sshd, root, "m")
    spec = HostSpec.parse(sshd.spec)
    original = build_runtime_wheel(tmp_path / "w0")
    upgraded = modified_runtime_wheel(tmp_path / "w1", "upgraded")
    old_id, new_id = (runtime_id(w.content_hash, device_python()) for w in (original, upgraded))

    deploy_to_host(spec, load_model_dir(model_dirs["v1"]), original, settings, log=lambda line: None)
    v1 = current_release(root, "m")
    assert _live(root) == Path("runtimes", old_id, "venv")
    assert _runs(root, "--version") == "edge-runtime 0.1.0"

    # A new runtime together with a model that fails its smoke test (under that new runtime).
    with pytest.raises(ReleaseError, match="smoke test failed"):
        deploy_to_host(spec, load_model_dir(model_dirs["bad_smoke"]), upgraded, settings, log=lambda line: None)
    assert _live(root) == Path("runtimes", old_id, "venv")
    assert current_release(root, "m") == v1
    assert _runs(root, "--version") == "edge-runtime 0.1.0"
    _runs(root, "check", str(root / "models" / "m" / "current"))
    # The new runtime stays, complete, for the next attempt.
    assert (root / "runtimes" / new_id / "runtime.json").is_file()

    # The same new runtime with a good model: reused (not reinstalled), then switched, then current.
    lines = []
    result = deploy_to_host(spec, load_model_dir(model_dirs["v2"]), upgraded, settings, log=lines.append)
    assert result.status == "deployed"
    assert not [line for line in lines if "installing runtime" in line], lines
    assert _live(root) == Path("runtimes", new_id, "venv")
    assert _runs(root, "--version") == "edge-runtime 0.1.0+upgraded"
    assert current_release(root, "m") == load_model_dir(model_dirs["v2"]).release_id
    assert _runtimes(root) == sorted([old_id, new_id])  # the previous runtime is kept for rollback
    assert not [p.name for p in root.iterdir() if p.name.startswith(".venv-")]

    # One more upgrade: the live and the previous runtimes stay, the older one goes.
    third = modified_runtime_wheel(tmp_path / "w2", "third")
    third_id = runtime_id(third.content_hash, device_python())
    deploy_to_host(spec, load_model_dir(model_dirs["v1"]), third, settings, log=lambda line: None)
    assert _live(root) == Path("runtimes", third_id, "venv")
    assert _runtimes(root) == sorted([new_id, third_id])
    assert deploy_to_host(spec, load_model_dir(model_dirs["v1"]), third, settings,
                          log=lambda line: None).status == "unchanged"

    # "Unchanged" means the live python still imports edge_runtime, not only that runtime.json says so.
    python = root / "runtimes" / third_id / "venv" / "bin" / "python"
    target = python.readlink()
    python.unlink()
    try:
        with Device.connect(spec, sshd.connect_options()) as device:
            facts = probe(device, device_python(), str(root))
        assert facts.runtime["hash"] == third.content_hash and not facts.runtime_works
        assert not runtime_is_current(facts, third.content_hash, device_python())
    finally:
        python.symlink_to(target)


@pytest.mark.slow  # ~20 s under load: builds runtime venvs on the device
def test_runtime_is_not_switched_when_another_model_would_break(sshd, model_dirs, tmp_path):
    root = tmp_path / "device root"
    spec = HostSpec.parse(sshd.spec)
    original = build_runtime_wheel(tmp_path / "w0")
    deploy_to_host(spec, load_model_dir(model_dirs["v1"]), original, _settings(sshd, root, "a"), log=print)
    deploy_to_host(spec, load_model_dir(model_dirs["v2"]), original, _settings(sshd, root, "b"), log=print)
    live, b_release = _live(root), current_release(root, "b")
    # A runtime that reads only a newer MODEL_DIR format, and a model `a` in that format: `a` alone
    # would pass, but `b`'s current release (format 3) would stop working under it.
    newer = modified_runtime_wheel(tmp_path / "w1", "format4", formats="(4,)")
    a_v2 = load_model_dir(with_format_version(model_dirs["v2"], tmp_path / "a-format4", 4), supported_versions=(4,))
    with pytest.raises(ReleaseError, match=f"cannot run b's current release {b_release}"):
        deploy_to_host(spec, a_v2, newer, _settings(sshd, root, "a"), log=print)
    assert _live(root) == live
    assert current_release(root, "a") == load_model_dir(model_dirs["v1"]).release_id
    assert sorted(p.name for p in (root / "models" / "a" / "releases").iterdir()) == [current_release(root, "a")]


@pytest.mark.slow  # ~20 s under load: builds runtime venvs on the device
def test_old_layout_migrates_only_after_the_smoke_test(sshd, model_dirs, edgeprune, tmp_path):
    root = tmp_path / "old root"
    wheel = build_runtime_wheel(tmp_path / "w0")
    v1 = make_legacy_device_root(root, wheel, model_dirs["v1"], "m")
    settings = _settings(sshd, root, "m")
    spec = HostSpec.parse(sshd.spec)

    with pytest.raises(ReleaseError, match="smoke test failed"):
        deploy_to_host(spec, load_model_dir(model_dirs["bad_smoke"]), wheel, settings, log=lambda line: None)
    assert (root / "venv").is_dir() and not (root / "venv").is_symlink()
    assert (root / "runtime.json").is_file() and current_release(root, "m") == v1
    _runs(root, "check", str(root / "models" / "m" / "current"))

    lines = []
    deploy_to_host(spec, load_model_dir(model_dirs["v2"]), wheel, settings, log=lines.append)
    assert _live(root) == Path("runtimes", runtime_id(wheel.content_hash, device_python()), "venv")
    assert not (root / "runtime.json").exists()
    assert sorted(p.name for p in root.iterdir()) == ["models", "runtimes", "venv"]
    assert current_release(root, "m") == load_model_dir(model_dirs["v2"]).release_id
    _runs(root, "check", str(root / "models" / "m" / "current"))
    assert any("old venv folder" in line for line in lines), lines

    listing = edgeprune("ls", sshd.spec, *deploy_args(sshd, root))
    assert listing.code == 0 and str(root / "runtimes") in listing.out, listing.err
    again = edgeprune("deploy", sshd.spec, model_dirs["v2"], "--name", "m", *deploy_args(sshd, root))
    assert again.code == 0 and "nothing to do" in again.out, again.err
