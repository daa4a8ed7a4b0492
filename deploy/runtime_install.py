"""Install (or keep) the ``edge_runtime`` on a device: a venv under the remote root.

The venv is created with ``--system-site-packages`` so Raspberry Pi OS's own ``python3-numpy`` and
``python3-scipy`` serve where present; only what is not importable in a good enough version is
installed, from the device's package index or, offline, from ``--wheelhouse`` (uploaded, then
``pip install --no-index --find-links``). The runtime itself is a wheel built from this checkout
(:mod:`deploy.wheel`); its content hash is recorded in ``runtime.json`` and an unchanged runtime is
not reinstalled.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from deploy.connection import Device
from deploy.errors import PreflightError, RemoteCommandError, UploadError
from deploy.preflight import DeviceFacts, probe, runtime_is_current, venv_python
from deploy.wheel import REQUIREMENTS, RuntimeWheel, build_runtime_wheel

Log = Callable[[str], None]

# Prints the requirements that are missing or too old in the venv (system site packages included).
_MISSING = r"""
import sys
from importlib import metadata
def key(v):
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        out.append(int(digits))
    return out
for spec in sys.argv[1:]:
    name, minimum = spec.split(">=")
    try:
        ok = key(metadata.version(name)) >= key(minimum)
    except metadata.PackageNotFoundError:
        ok = False
    if not ok:
        print(spec)
"""


def ensure_runtime(device: Device, python: str = "python3", remote_root: str = "~/.edgeprune",
                   wheelhouse: Optional[Path] = None, facts: Optional[DeviceFacts] = None,
                   wheel: Optional[RuntimeWheel] = None, log: Optional[Log] = None) -> str:
    """Make sure this checkout's runtime is installed on the device; return the venv's python path.

    ``python``: the device interpreter the venv is built from. ``remote_root``: where the venv and
    ``runtime.json`` live (``~`` is the remote home). ``wheelhouse``: a local folder of wheels for
    devices without internet. ``facts``/``wheel``: a probe and a built wheel the caller already has.
    Idempotent: when ``runtime.json`` records the same content hash and interpreter, nothing happens.
    Raises PreflightError (no venv support, pip failure, ...) or a connection error.
    """
    log = log or (lambda message: None)
    root = device.resolve_path(remote_root)
    facts = facts or probe(device, python, root)
    with tempfile.TemporaryDirectory(prefix="edgeprune-wheel-") as build_dir:
        wheel = wheel or build_runtime_wheel(Path(build_dir))
        target = venv_python(root)
        if runtime_is_current(facts, wheel.content_hash, python) and _runs(device, target):
            log(f"runtime {wheel.version} already installed")
            return target
        log(f"installing runtime {wheel.version}")
        device.run(["mkdir", "-p", root])
        if not _runs(device, target) or (facts.runtime or {}).get("base_python") != python:
            _create_venv(device, python, root)
        staging = posixpath.join(root, f"tmp-runtime-{int(time.time() * 1000)}")
        device.run(["mkdir", "-p", staging])
        try:
            find_links = _upload_wheelhouse(device, wheelhouse, root) if wheelhouse else None
            _install_missing(device, target, find_links)
            remote_wheel = posixpath.join(staging, wheel.path.name)
            device.put(wheel.path, remote_wheel)
            _pip(device, target, ["--no-deps", "--force-reinstall", remote_wheel])
        finally:
            device.run(["rm", "-rf", staging], check=False)
        version = device.run([target, "-m", "edge_runtime", "--version"], timeout=300).stdout.strip()
        record = {"hash": wheel.content_hash, "version": wheel.version, "base_python": python,
                  "python": target, "reported": version, "installed": time.strftime("%Y-%m-%dT%H:%M:%S")}
        device.write_text(posixpath.join(root, "runtime.json"), json.dumps(record, indent=1) + "\n")
        log(f"runtime installed: {version}")
        return target


def installed_runtime(device: Device, remote_root: str) -> Optional[dict]:
    """The device's ``runtime.json`` (hash, version, interpreter), or None if none is installed."""
    text = device.read_text(posixpath.join(device.resolve_path(remote_root), "runtime.json"))
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _runs(device: Device, interpreter: str) -> bool:
    return device.run([interpreter, "-c", "pass"], check=False, timeout=120).ok


def _create_venv(device: Device, python: str, root: str) -> None:
    venv = posixpath.join(root, "venv")
    device.run(["rm", "-rf", venv])
    try:
        device.run([python, "-m", "venv", "--system-site-packages", venv], timeout=600)
    except RemoteCommandError as error:
        if "ensurepip" in error.stderr or "venv" in error.stderr:
            raise PreflightError(f"{device.label}: cannot create a venv with {python}; on Debian/Raspberry Pi OS "
                                 "run `sudo apt install python3-venv`") from None
        raise


def _install_missing(device: Device, target: str, find_links: Optional[str]) -> None:
    specs = [f"{dist}>={minimum}" for dist, minimum, _ in REQUIREMENTS]
    missing = device.run([target, "-c", _MISSING, *specs], timeout=300).stdout.split()
    if not missing:
        return
    index = ["--no-index", "--find-links", find_links] if find_links else []
    try:
        _pip(device, target, [*index, *missing])
    except PreflightError as error:
        hint = "is the wheelhouse complete for this device?" if find_links else \
            "does the device reach its package index? (else pass --wheelhouse DIR)"
        raise PreflightError(f"{error} — {hint}") from None


def _pip(device: Device, target: str, args: list) -> None:
    try:
        # --no-compile: Python compiles on first import anyway; compiling every file of every
        # dependency up front costs minutes on a Pi Zero (or under emulation) for nothing.
        device.run([target, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                    "--no-warn-script-location", "--no-compile", "-q", *args], timeout=1800)
    except RemoteCommandError as error:
        raise PreflightError(f"{device.label}: pip install {' '.join(args[-2:])} failed: "
                             f"{(error.stderr.strip().splitlines() or ['?'])[-1]}") from None


def _upload_wheelhouse(device: Device, wheelhouse: Path, root: str) -> str:
    """Upload the wheels the device does not already have (same name and size); return the folder."""
    if not Path(wheelhouse).is_dir():
        raise UploadError(f"--wheelhouse {wheelhouse} is not a folder")
    remote = posixpath.join(root, "wheelhouse")
    device.mkdir(remote)
    present = {entry.filename: entry.st_size for entry in device.sftp.listdir_attr(remote)}
    for wheel in sorted(Path(wheelhouse).iterdir()):
        if wheel.is_file() and present.get(wheel.name) != wheel.stat().st_size:
            # Upload under a temporary name so a cut connection never leaves a truncated wheel.
            partial = posixpath.join(remote, wheel.name + ".partial")
            device.put(wheel, partial)
            device.rename(partial, posixpath.join(remote, wheel.name))
    return remote
