"""Deploy one MODEL_DIR to one host, or to a fleet in parallel with a per-host result.

One host, in order: connect → lock the remote root (:mod:`deploy.root_lock`) → preflight → install
a changed runtime into its own folder → upload to a temporary folder (again if the copy on the
device is damaged) → verify sha256s on the device → smoke test under the new runtime (and, if the
runtime changes, every other model's current release too) → move to ``releases/ID`` → switch the
``venv`` link → switch ``current`` → prune old releases and runtimes. Any failure stops before the switches, so
the previous runtime and release stay live and intact (see :mod:`deploy.release`,
:mod:`deploy.runtime_install`).
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from deploy.device import Device, Progress
from deploy.ssh_config import ConnectOptions, HostSpec
from deploy.errors import DeployError, PreflightError, ReleaseError
from deploy.model_dir import LocalModel
from deploy.preflight import check, probe, runtime_is_current, venv_python
from deploy.release import RemoteModel, list_models
from deploy.root_lock import hold_root_lock
from deploy.runtime_install import Runtime, activate_runtime, prepare_runtime
from deploy.wheel import RuntimeWheel

Log = Callable[[str], None]


@dataclass
class DeploySettings:
    """Everything `edgeprune deploy` was told besides the hosts and MODEL_DIR."""

    name: str
    connect: ConnectOptions = field(default_factory=ConnectOptions)
    python: str = "python3"
    remote_root: str = "~/.edgeprune"
    wheelhouse: Optional[Path] = None
    keep: int = 3
    progress: bool = False  # show tqdm bars (stderr); the CLI turns them on for a terminal


@dataclass
class HostResult:
    """How deploying to one host ended (the fleet table has one row per result)."""

    host: str
    status: str  # "deployed", "unchanged" or "failed"
    release: Optional[str] = None
    previous: Optional[str] = None
    smoke: str = ""
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def deploy_to_host(spec: HostSpec, model: LocalModel, wheel: RuntimeWheel, settings: DeploySettings,
                   log: Log, bar_position: int = 0, progress: Optional[Progress] = None,
                   on_connect: Optional[Callable[[Device], None]] = None) -> HostResult:
    """Deploy ``model`` to one host; raises DeployError (one line) on any failure.

    ``progress`` is called with each uploaded chunk's size, besides the progress bar. ``on_connect``
    is given the open Device first (a fleet deploy keeps them, to cut them all on Ctrl-C).
    """
    started = time.monotonic()
    with Device.connect(spec, settings.connect) as device:
        if on_connect is not None:
            on_connect(device)
        root = device.resolve_path(settings.remote_root)
        made = device.run(["mkdir", "-p", root], check=False)  # the lock lives in it
        if not made.ok:
            raise PreflightError(f"{device.label}: cannot create {settings.remote_root} "
                                 f"({made.stderr.strip() or made.exit_status}); choose another --remote-root")
        with hold_root_lock(device, root, warn=log):
            return _deploy_locked(device, root, model, wheel, settings, log, bar_position, progress, started)


def _deploy_locked(device: Device, root: str, model: LocalModel, wheel: RuntimeWheel, settings: DeploySettings,
                   log: Log, bar_position: int, progress: Optional[Progress], started: float) -> HostResult:
    """deploy_to_host's steps, run while this deploy holds the root's lock (no other deploy can race it)."""
    facts = probe(device, settings.python, root)
    log(f"{device.label}: {facts.summary()}")
    remote = RemoteModel(device, root, settings.name)
    previous = remote.current_id()
    runtime_ok = runtime_is_current(facts, wheel.content_hash, settings.python)
    if previous == model.release_id and runtime_ok:
        log(f"{device.label}: {settings.name} is already at release {previous}; nothing to do")
        return HostResult(device.label, "unchanged", previous, previous, seconds=time.monotonic() - started)

    on_device = {release.id for release in remote.releases()}
    # A copy already on the device is used only if it still matches its hashes; a damaged one is
    # uploaded again (else it would block this artifact, and rollbacks to it, for good).
    fresh = model.release_id not in on_device or _damaged(remote, model.release_id, log)
    upload_bytes = (model.size if fresh else 0) + (0 if runtime_ok else wheel.path.stat().st_size)
    check(facts, device, settings.python, settings.remote_root, upload_bytes)

    def host_log(message: str) -> None:
        log(f"{device.label}: {message}")

    # A changed runtime goes into its own folder; the live one keeps serving until the switch.
    new_runtime = None if runtime_ok else prepare_runtime(device, settings.python, root, wheel,
                                                          settings.wheelhouse, host_log)
    python = new_runtime.python if new_runtime else venv_python(root)
    remote.remove_stale_uploads()

    if fresh:
        log(f"{device.label}: uploading {settings.name} ({len(model.files)} files, {model.size / 2**20:.2f} MiB) "
            f"as release {model.release_id}")
        candidate = _upload_with_bar(remote, model, settings.progress, device.label, bar_position, progress)
        try:
            remote.verify(candidate, model.files)
        except BaseException:
            remote.remove(candidate)
            raise
        log(f"{device.label}: {len(model.files)} sha256s verified on the device")
    else:
        candidate = remote.release_dir(model.release_id)
        log(f"{device.label}: release {model.release_id} is already on the device (verified)")

    # Smoke-tested before it becomes releases/ID: a deploy killed here leaves only a .tmp- folder,
    # never a release that was not tested (and would count toward --keep).
    try:
        smoke = remote.smoke_test(candidate, python).replace(candidate, remote.release_dir(model.release_id))
        if new_runtime:
            _check_other_models(device, root, settings.name, new_runtime)
    except BaseException:
        if fresh:
            remote.remove(candidate)
        raise
    if fresh:
        remote.promote(candidate, model.release_id, replace=model.release_id in on_device)
    elif previous != model.release_id:
        device.run(["touch", candidate])  # mtime = when it was last deployed (ordering, --keep)
    log(f"{device.label}: smoke test: {smoke}")
    if new_runtime:
        removed = activate_runtime(device, root, new_runtime, host_log)
        log(f"{device.label}: runtime {new_runtime.id} is now live"
            + (f"; removed old runtimes {', '.join(removed)}" if removed else ""))
    if previous != model.release_id:
        remote.switch(model.release_id)
    pruned = remote.prune(settings.keep)
    log(f"{device.label}: {settings.name} is now at release {model.release_id}"
        + (f" (was {previous})" if previous and previous != model.release_id else "")
        + (f"; removed old releases {', '.join(pruned)}" if pruned else ""))
    return HostResult(device.label, "deployed", model.release_id, previous, smoke, time.monotonic() - started)


def _damaged(remote: RemoteModel, release_id: str, log: Log) -> bool:
    """Whether the copy of ``release_id`` on the device fails its own manifest's hashes (logged)."""
    try:
        remote.verify_release(release_id)
    except ReleaseError as error:
        log(f"{remote.device.label}: release {release_id} on the device is damaged ({error}); uploading it again")
        return True
    return False


def _check_other_models(device: Device, root: str, name: str, runtime: Runtime) -> None:
    """Smoke-test every other model's current release under ``runtime`` before it goes live.

    The runtime is shared by every model on the device: switching it must not break one that this
    deploy does not touch. ReleaseError (from the smoke test) names the model that would break.
    """
    for other in list_models(device, root):
        remote = RemoteModel(device, root, other)
        current = remote.current_id() if other != name else None
        if current:
            try:
                remote.smoke_test(remote.release_dir(current), runtime.python)
            except ReleaseError as error:
                raise ReleaseError(f"{error} (the new runtime {runtime.id} cannot run {other}'s current release "
                                   f"{current}; the runtime was not switched)") from None


def _upload_with_bar(remote: RemoteModel, model: LocalModel, show: bool, label: str, position: int,
                     progress: Optional[Progress]) -> str:
    from tqdm import tqdm

    with tqdm(total=model.size, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
              disable=not show, position=position, leave=False) as bar:
        def advance(count: int) -> None:
            bar.update(count)
            if progress is not None:
                progress(count)

        return remote.upload(model, progress=advance)


def deploy_fleet(specs: Sequence[HostSpec], model: LocalModel, wheel: RuntimeWheel, settings: DeploySettings,
                 jobs: int, log: Log) -> List[HostResult]:
    """Deploy to every host, ``jobs`` at a time; one host's failure never stops the others.

    Ctrl-C (KeyboardInterrupt in the calling thread) cuts every open connection at once, cancels the
    hosts not started yet and is re-raised without waiting for the devices.
    """
    lock = threading.Lock()
    open_devices: List[Device] = []
    stopping = threading.Event()

    def locked_log(message: str) -> None:
        with lock:
            log(message)

    def track(device: Device) -> None:
        with lock:
            open_devices.append(device)
            if stopping.is_set():
                device.abort()

    def one(index_spec) -> HostResult:
        index, spec = index_spec
        started = time.monotonic()
        try:
            return deploy_to_host(spec, model, wheel, settings, locked_log, bar_position=index, on_connect=track)
        except DeployError as error:
            reason = _without_host(str(error), spec)
            if not stopping.is_set():
                locked_log(f"{spec}: FAILED: {reason}")
            return HostResult(str(spec), "failed", seconds=time.monotonic() - started, error=reason)
        except Exception as error:  # noqa: BLE001 - a bug on one host must not hide the others' results
            locked_log(f"{spec}: FAILED (internal error): {type(error).__name__}: {error}")
            return HostResult(str(spec), "failed", seconds=time.monotonic() - started,
                              error=f"internal error: {type(error).__name__}: {error}")

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        return list(pool.map(one, enumerate(specs)))
    except KeyboardInterrupt:
        with lock:
            stopping.set()
            for device in open_devices:
                device.abort()  # each worker's next step fails at once; the devices end what we started
        raise
    finally:
        pool.shutdown(wait=not stopping.is_set(), cancel_futures=stopping.is_set())


def _without_host(message: str, spec: HostSpec) -> str:
    """``message`` without a leading "HOST: " (or "USER@HOST:PORT: "): the line already starts with the host."""
    head, sep, rest = message.partition(": ")
    return rest if sep and spec.host in head and " " not in head else message


def result_table(results: Sequence[HostResult]) -> str:
    """The per-host summary printed at the end of a fleet deploy."""
    rows = [("HOST", "STATUS", "RELEASE", "TIME", "DETAIL")]
    for result in results:
        detail = result.error if not result.ok else (result.smoke or "already current")
        rows.append((result.host, result.status, result.release or "-", f"{result.seconds:.1f}s", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
                     for row in rows)
