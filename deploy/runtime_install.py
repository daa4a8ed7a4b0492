"""Install the ``edge_runtime`` on a device as versioned runtimes, switched like releases.

Layout under the remote root (ARCHITECTURE.md)::

    runtimes/ID/venv/          # ID = the wheel's content hash + "-" + 6 hex digits naming the base python
    runtimes/ID/runtime.json   # written last: its presence means the runtime is complete
    venv -> runtimes/ID/venv   # the live runtime, switched by one rename(2) of a fresh link

A new runtime is built in its own folder and never touches the live one. Deploy smoke-tests the new
release with the new runtime's python and only then switches ``venv`` (:func:`activate_runtime`),
then ``current``; a failure before that leaves both as they were. The new folder is left behind on a
failure, so the next attempt with the same wheel reuses it instead of reinstalling; if it never goes
live, the next switch prunes it. A switch keeps the live runtime and the one before it (what
``rollback`` may need) and removes every other.

Why a marker file and not "build under a temporary name, then rename": a venv is not relocatable (pip
writes the venv's absolute path into the scripts in ``bin/``), so it is built where it will live. A
folder without its ``runtime.json`` (a dropped connection mid-install) is never used: the next attempt
removes it and builds it again.

Each venv is created with ``--system-site-packages`` so Raspberry Pi OS's own ``python3-numpy`` and
``python3-scipy`` serve where present; only what is not importable in a good enough version is
installed, from the device's package index or, offline, from ``--wheelhouse`` (uploaded, then
``pip install --no-index --find-links``). The runtime itself is a wheel built from this checkout
(:mod:`deploy.wheel`).

Migration: a device written before versioned runtimes has a real ``venv`` folder (and
``runtime.json`` at the root). It keeps working until a new runtime has passed the smoke test; then
the folder is renamed aside, the link takes its place and the old folder is deleted.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from deploy.device import Device, temp_stamp
from deploy.errors import PreflightError, RemoteCommandError, UploadError
from deploy.preflight import DeviceFacts, probe, runtime_is_current, venv_python
from deploy.wheel import REQUIREMENTS, RuntimeWheel, build_runtime_wheel

Log = Callable[[str], None]

RUNTIMES = "runtimes"
RECORD = "runtime.json"

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

# Replaces a legacy venv folder ($1) by the new link ($2), moving the folder aside ($3) first; puts it
# back if the link cannot take its place. One shell on the device, so a connection dropped half-way
# cannot leave the device without a venv.
_MIGRATE = 'mv -T "$1" "$3" && { mv -T "$2" "$1" || { mv -T "$3" "$1"; exit 1; }; }'


@dataclass(frozen=True)
class Runtime:
    """One complete runtime folder on the device."""

    id: str
    folder: str  # ROOT/runtimes/ID
    python: str  # ROOT/runtimes/ID/venv/bin/python
    record: dict  # its runtime.json


def runtime_id(content_hash: str, python: str) -> str:
    """The folder name of the runtime built from a wheel's ``content_hash`` with the device's ``python``.

    The interpreter is part of the name because a venv is tied to the Python it was made from.
    """
    return f"{content_hash}-{hashlib.sha256(python.encode()).hexdigest()[:6]}"


def prepare_runtime(device: Device, python: str, root: str, wheel: RuntimeWheel,
                    wheelhouse: Optional[Path] = None, log: Optional[Log] = None) -> Runtime:
    """Install ``wheel`` into ``runtimes/ID`` (or find it there, complete) without touching the live runtime.

    ``root`` is the absolute remote root. Raises PreflightError (no venv support, pip failure, ...),
    UploadError or a connection error; a half-built folder is never used and is rebuilt next time.
    """
    log = log or (lambda message: None)
    ident = runtime_id(wheel.content_hash, python)
    folder = posixpath.join(root, RUNTIMES, ident)
    found = _complete(device, folder, ident)
    if found is not None:
        log(f"runtime {wheel.version} already installed in {RUNTIMES}/{ident}")
        return found
    log(f"installing runtime {wheel.version} into {RUNTIMES}/{ident}")
    device.run(["rm", "-rf", "--", folder])  # an incomplete one from an interrupted attempt
    device.run(["mkdir", "-p", folder])
    target = posixpath.join(folder, "venv", "bin", "python")
    _create_venv(device, python, posixpath.join(folder, "venv"))
    staging = posixpath.join(folder, "staging")
    device.run(["mkdir", "-p", staging])
    try:
        find_links = _upload_wheelhouse(device, wheelhouse, root) if wheelhouse else None
        _install_missing(device, target, find_links)
        remote_wheel = posixpath.join(staging, wheel.path.name)
        device.put(wheel.path, remote_wheel)
        _pip(device, target, ["--no-deps", "--force-reinstall", remote_wheel])
    finally:
        device.run(["rm", "-rf", "--", staging], check=False)
    version = device.run([target, "-m", "edge_runtime", "--version"], timeout=300).stdout.strip()
    record = {"id": ident, "hash": wheel.content_hash, "version": wheel.version, "base_python": python,
              "python": target, "reported": version, "installed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    device.write_text(posixpath.join(folder, RECORD), json.dumps(record, indent=1) + "\n")
    log(f"runtime installed: {version}")
    return Runtime(ident, folder, target, record)


def activate_runtime(device: Device, root: str, runtime: Runtime, log: Optional[Log] = None) -> List[str]:
    """Make ``runtime`` the live one (``venv`` -> ``runtimes/ID/venv``, one rename); prune old runtimes.

    Call it only once the new release has passed its smoke test under ``runtime.python``. A legacy
    ``venv`` folder is replaced by the link and then deleted. Keeps the runtime that was live before
    (rollback may need it) and returns the ids of the runtimes removed.
    """
    log = log or (lambda message: None)
    venv = posixpath.join(root, "venv")
    previous = live_runtime_id(device, root)
    legacy = previous is None and device.is_dir(venv)
    stamp = temp_stamp()
    temp_link = posixpath.join(root, f".venv-{stamp}")
    device.run(["ln", "-s", posixpath.join(RUNTIMES, runtime.id, "venv"), temp_link])
    try:
        if legacy:
            aside = posixpath.join(root, f".venv-legacy-{stamp}")
            device.run(["sh", "-c", _MIGRATE, "sh", venv, temp_link, aside])
        else:
            device.run(["mv", "-T", temp_link, venv])
    except RemoteCommandError:
        device.run(["rm", "-f", "--", temp_link], check=False)
        raise
    if legacy:
        device.run(["rm", "-rf", "--", aside, posixpath.join(root, RECORD)])
        log(f"moved the runtime from the old venv folder to {RUNTIMES}/{runtime.id}")
    return _prune(device, root, keep={runtime.id, previous})


def ensure_runtime(device: Device, python: str = "python3", remote_root: str = "~/.edgeprune",
                   wheelhouse: Optional[Path] = None, facts: Optional[DeviceFacts] = None,
                   wheel: Optional[RuntimeWheel] = None, log: Optional[Log] = None) -> str:
    """Make sure this checkout's runtime is installed on the device; return the python to run it with.

    For callers that switch no release (the bench harness, test fixtures). When the live runtime is
    this one: ``ROOT/venv/bin/python``. Otherwise it is installed in its own folder and that folder's
    python is returned; the live runtime stays live (only deploy switches it, after a smoke test),
    except on a device with no runtime at all, where nothing can break and it goes live at once.
    ``python``: the device interpreter the venv is built from. ``remote_root``: where runtimes live
    (``~`` is the remote home). ``wheelhouse``: a local folder of wheels for devices without internet.
    ``facts``/``wheel``: a probe and a built wheel the caller already has.
    Raises PreflightError (no venv support, pip failure, ...) or a connection error.
    """
    log = log or (lambda message: None)
    root = device.resolve_path(remote_root)
    facts = facts or probe(device, python, root)
    with tempfile.TemporaryDirectory(prefix="edgeprune-wheel-") as build_dir:
        wheel = wheel or build_runtime_wheel(Path(build_dir))
        if runtime_is_current(facts, wheel.content_hash, python):
            log(f"runtime {wheel.version} already installed")
            return venv_python(root)
        runtime = prepare_runtime(device, python, root, wheel, wheelhouse, log)
    if facts.runtime_state == "none":
        activate_runtime(device, root, runtime, log)
        return venv_python(root)
    return runtime.python


def live_runtime_id(device: Device, root: str) -> Optional[str]:
    """The id of the runtime ``venv`` links to, or None (no runtime, or a legacy venv folder)."""
    target = device.readlink(posixpath.join(root, "venv"))
    if not target:
        return None
    return posixpath.basename(posixpath.dirname(target.rstrip("/")))


def installed_runtime(device: Device, remote_root: str) -> Optional[dict]:
    """The live runtime's ``runtime.json`` (hash, version, interpreter), or None if none is installed."""
    root = device.resolve_path(remote_root)
    ident = live_runtime_id(device, root)
    path = posixpath.join(root, RUNTIMES, ident, RECORD) if ident else posixpath.join(root, RECORD)
    text = device.read_text(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _complete(device: Device, folder: str, ident: str) -> Optional[Runtime]:
    """The runtime in ``folder`` if its record says it is complete and its python imports edge_runtime."""
    text = device.read_text(posixpath.join(folder, RECORD))
    try:
        record = json.loads(text) if text else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("id") != ident:
        return None
    target = posixpath.join(folder, "venv", "bin", "python")
    if not device.run([target, "-c", "import edge_runtime"], check=False, timeout=120).ok:
        return None
    return Runtime(ident, folder, target, record)


def _prune(device: Device, root: str, keep: set) -> List[str]:
    """Delete runtime folders not in ``keep`` (ids); return the ids removed."""
    base = posixpath.join(root, RUNTIMES)
    doomed = sorted(name for name in device.listdir(base) if name not in keep)
    if doomed:
        device.run(["rm", "-rf", "--", *(posixpath.join(base, name) for name in doomed)])
    return doomed


def _create_venv(device: Device, python: str, venv: str) -> None:
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
