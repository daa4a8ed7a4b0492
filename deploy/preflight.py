"""Ask the device what it is before touching it: one round trip, one small Python script.

The probe runs under the device's own Python (``--python``), so a missing or too old interpreter is
found first; it reports the architecture, the Python and numpy/scipy/onnxruntime versions its system
site packages provide, whether ``venv``/``ensurepip`` work, free disk space at the remote root, the
live runtime there and whether its python still imports ``edge_runtime`` (a cheap check that the
``venv`` link's target exists and is whole, not only that a record says so).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Optional

from deploy.device import Device
from deploy.errors import PreflightError, RemoteCommandError

MIN_PYTHON = (3, 9)

# Runs on the device under Python >= 3.6 syntax, so that a too-old Python is reported, not crashed on.
_PROBE = r"""
import json, os, platform, sys
root = sys.argv[1]
facts = {"machine": platform.machine(), "python": platform.python_version(),
         "executable": sys.executable, "packages": {}}
try:
    from importlib import metadata
except ImportError:
    metadata = None
for dist in ("numpy", "scipy", "onnxruntime"):
    try:
        facts["packages"][dist] = metadata.version(dist) if metadata else None
    except Exception:
        facts["packages"][dist] = None
import importlib.util
facts["venv"] = all(importlib.util.find_spec(m) is not None for m in ("venv", "ensurepip"))
probe = root
while not os.path.isdir(probe):
    probe = os.path.dirname(probe)
st = os.statvfs(probe)
facts["free_bytes"] = st.f_bavail * st.f_frsize
facts["writable"] = os.access(probe, os.W_OK)
# The live runtime: venv -> runtimes/ID/venv (its record beside it), or a venv folder written by
# edgeprune before versioned runtimes ("legacy", recorded in ROOT/runtime.json).
venv = os.path.join(root, "venv")
if os.path.islink(venv):
    facts["runtime_state"] = "link"
    record = os.path.join(os.path.dirname(os.path.realpath(venv)), "runtime.json")
elif os.path.isdir(venv):
    facts["runtime_state"] = "legacy"
    record = os.path.join(root, "runtime.json")
else:
    facts["runtime_state"] = "none"
    record = None
try:
    with open(record) as f:
        facts["runtime"] = json.load(f)
except Exception:
    facts["runtime"] = None
facts["runtime_works"] = False
if facts["runtime"] is not None:
    import subprocess
    try:
        facts["runtime_works"] = subprocess.call(
            [os.path.join(venv, "bin", "python"), "-c", "import edge_runtime"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60) == 0
    except Exception:
        pass
try:
    with open("/etc/os-release") as f:
        facts["os"] = dict(l.rstrip().split("=", 1) for l in f if "=" in l).get("PRETTY_NAME", "").strip('"')
except Exception:
    facts["os"] = ""
print(json.dumps(facts))
"""


@dataclass(frozen=True)
class DeviceFacts:
    """What the probe found on the device."""

    machine: str
    python: str
    executable: str
    packages: dict  # distribution -> version or None
    has_venv: bool
    free_bytes: int
    writable: bool
    runtime: Optional[dict]  # the live runtime's runtime.json, or None
    os: str
    #: ``venv`` under the root: "link" (to runtimes/ID/venv), "legacy" (a folder), "none".
    runtime_state: str = "none"
    runtime_works: bool = False  # the live venv's python imports edge_runtime

    def summary(self) -> str:
        """``aarch64, Python 3.11.2, numpy 1.24.2, ...`` as deploy prints it."""
        parts = [self.machine, f"Python {self.python}"]
        parts += [f"{name} {version}" for name, version in self.packages.items() if version]
        if self.runtime:
            parts.append(f"runtime {self.runtime.get('version', '?')}")
        return ", ".join(parts)


def probe(device: Device, python: str, remote_root: str) -> DeviceFacts:
    """Run the probe with ``python`` on the device; PreflightError if there is no usable Python."""
    root = device.resolve_path(remote_root)
    try:
        result = device.run([python, "-c", _PROBE, root], timeout=120)
    except RemoteCommandError as error:
        if error.exit_status in (126, 127):
            raise PreflightError(f"{device.label}: no Python at {python!r}; install python3 (>= 3.9) "
                                 "or point --python at one") from None
        raise PreflightError(f"{device.label}: {python} cannot run the device probe: "
                             f"{(error.stderr.strip().splitlines() or ['?'])[-1]}") from None
    try:
        # The last line: a sitecustomize or shell profile may print before the probe does.
        raw = json.loads(result.stdout.strip().splitlines()[-1])
        return DeviceFacts(raw["machine"], raw["python"], raw["executable"], raw["packages"], raw["venv"],
                           int(raw["free_bytes"]), bool(raw["writable"]), raw["runtime"], raw.get("os", ""),
                           raw["runtime_state"], bool(raw["runtime_works"]))
    except (ValueError, IndexError, KeyError, TypeError, AttributeError):
        raise PreflightError(f"{device.label}: the device probe printed something unexpected") from None


def check(facts: DeviceFacts, device: Device, python: str, remote_root: str, upload_bytes: int) -> None:
    """Refuse, with the fix, a device that cannot take the deploy. ``upload_bytes``: what will be sent."""
    version = tuple(int(part) for part in facts.python.split(".")[:2])
    if version < MIN_PYTHON:
        raise PreflightError(f"{device.label}: Python {facts.python} at {python} is too old; the runtime needs "
                             ">= 3.9 (point --python at a newer one)")
    if not facts.has_venv and not (facts.runtime and facts.runtime.get("python")):
        raise PreflightError(f"{device.label}: Python {facts.python} has no venv/ensurepip; on Debian/Raspberry "
                             "Pi OS run `sudo apt install python3-venv`")
    if not facts.writable:
        raise PreflightError(f"{device.label}: {remote_root} is not writable; choose another --remote-root")
    # Room for the upload twice over (temporary copy + release) and some slack for pip and the venv.
    needed = 2 * upload_bytes + 32 * 2**20
    if facts.free_bytes < needed:
        raise PreflightError(
            f"{device.label}: not enough disk space at {remote_root}: {facts.free_bytes / 2**20:.1f} MiB free, "
            f"{needed / 2**20:.1f} MiB needed; free some space (e.g. `edgeprune rollback` + --keep 1) or "
            "choose another --remote-root")


def runtime_is_current(facts: DeviceFacts, content_hash: str, python: str) -> bool:
    """Whether the live runtime is this checkout's, built for this Python, and still imports.

    A legacy ``venv`` folder never counts: the next deploy moves it to a versioned runtime.
    """
    return bool(facts.runtime_state == "link" and facts.runtime_works and facts.runtime
                and facts.runtime.get("hash") == content_hash and facts.runtime.get("base_python") == python)


def venv_python(root: str) -> str:
    """The live runtime's interpreter under an (absolute) remote root (``venv`` is a link to it)."""
    return posixpath.join(root, "venv", "bin", "python")
