"""Where a sweep runs: this machine (``local``) or a device over SSH, behind one small interface.

Both targets do the same four things, so the sweep code never asks which one it has:

- ``open()``: get ready (over SSH: connect, install the runtime, copy the two device scripts);
- ``facts(quick)``: run ``device_facts_probe.py`` with the device's Python;
- ``stage(model)``: the path of a model on the device (over SSH: uploaded once to ``scratch/``);
- ``bench(path, kernels, threads, options)``: one configuration in its own process, under
  ``bench_supervisor.py``, which bounds it in time and kills it if we go away.

``abort()`` may be called from another thread (Ctrl-C in the main thread) to stop what is running.
:func:`clean_scratch` removes what bench left in a device's ``scratch/`` (``edgeprune bench --clean``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Protocol, Tuple

from benchmarks.device_facts import DEVICE_SCRIPTS, PROBE_SCRIPT, SUPERVISOR_SCRIPT
from benchmarks.device_output import clean_envelope, clean_facts, envelope_problem, strict_json
from benchmarks.errors import ModelDirError, TargetError, TargetTimeout
from benchmarks.sweep_plan import ModelEntry, parse_manifest

DEPLOYED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SUPERVISOR_MARGIN_S = 30.0  # the supervisor's own time limit is the configuration's; this bounds the rest


class Target(Protocol):
    """What the sweep needs of a place to measure on (this module's docstring says what each does)."""

    name: str

    def open(self) -> None: ...

    def facts(self, quick: bool = False) -> Dict[str, object]: ...

    def stage(self, entry: ModelEntry) -> Tuple[str, Optional[Dict[str, object]]]: ...

    def bench(self, path: str, kernels: str, threads: int, options: "BenchOptions") -> Dict[str, object]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


def target_for(host: str, connect: Optional[object] = None, remote_root: str = "~/.edgeprune",
               python: Optional[str] = None, wheelhouse: Optional[str] = None) -> Target:
    """The target a command-line host string names: ``local`` for this machine, else ``[USER@]HOST[:PORT]``.

    ``connect`` is deploy's ``ConnectOptions`` (host keys, key file, timeouts) for an SSH target.
    """
    if host == "local":
        return LocalTarget(python=python)
    from deploy.ssh_config import HostSpec
    from deploy.errors import DeployError

    try:
        HostSpec.parse(host)
    except DeployError as error:
        raise TargetError(str(error)) from None
    return SshTarget(host, connect, remote_root=remote_root, python=python or "python3", wheelhouse=wheelhouse)


@dataclass(frozen=True)
class BenchOptions:
    """The per-configuration settings passed on to ``edge-runtime bench``."""

    warmup: Optional[int] = None
    iters: Optional[int] = None
    min_seconds: Optional[float] = None
    batch: Optional[int] = None
    timeout_s: float = 300.0


def runtime_argv(python: str, model_path: str, kernels: str, threads: int, options: BenchOptions) -> List[str]:
    """``python -m edge_runtime bench MODEL --json ...`` for one configuration."""
    argv = [python, "-m", "edge_runtime", "bench", model_path, "--json",
            "--kernels", kernels, "--threads", str(threads)]
    for flag, value in (("--warmup", options.warmup), ("--iters", options.iters),
                        ("--min-seconds", options.min_seconds), ("--batch", options.batch)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def supervised_argv(python: str, tools_dir: str, timeout_s: float, command: List[str]) -> List[str]:
    """``command`` wrapped in bench_supervisor.py (found in ``tools_dir`` on the device)."""
    supervisor = posixpath.join(tools_dir, SUPERVISOR_SCRIPT.name)
    return [python, supervisor, "--timeout", f"{timeout_s:g}", "--", *command]


def parse_envelope(stdout: str, stderr: str, exit_status: int, cut_note: str = "") -> Dict[str, object]:
    """The supervisor's JSON, checked; a synthetic failed envelope when it printed none (it could not
    start: its stderr says why), printed too much (``cut_note``: the connection kept only part of it),
    or sent a bad one."""
    if cut_note:
        return _failed_envelope(exit_status, cut_note)
    try:
        envelope = strict_json(stdout.strip().splitlines()[-1]) if stdout.strip() else None
    except ValueError as error:
        return _failed_envelope(exit_status, stderr or f"the supervisor printed bad JSON ({str(error)[:120]})")
    if not isinstance(envelope, dict) or "returncode" not in envelope:
        return _failed_envelope(exit_status, stderr or stdout or "the supervisor printed nothing")
    problem = envelope_problem(envelope)
    if problem is not None:
        return _failed_envelope(exit_status, f"the supervisor sent a bad envelope: {problem}")
    return clean_envelope(envelope)


def _failed_envelope(exit_status: int, why: str) -> Dict[str, object]:
    return {"returncode": exit_status or 1, "timed_out": False, "wall_s": None, "stdout": "", "stderr": why[-4000:],
            "temperature_c_before": None, "temperature_c_after": None, "throttled_after": None}


def timeout_envelope(message: str) -> Dict[str, object]:
    """The envelope of a configuration that hung past every limit (its supervisor printed nothing)."""
    return {"returncode": None, "timed_out": True, "wall_s": None, "stdout": "", "stderr": message,
            "temperature_c_before": None, "temperature_c_after": None, "throttled_after": None}


def parse_facts(stdout: str, where: str) -> Dict[str, object]:
    """The probe's JSON; TargetError when it printed something else."""
    try:
        facts = strict_json(stdout)
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        raise TargetError(f"{where}: the device facts probe printed no JSON: {stdout.strip()[:200]!r}")
    return clean_facts(facts)


SCRATCH_DAYS = 7  # bench's uploads unused this long are removed when bench next opens the device


def model_content_id(entry: ModelEntry) -> str:
    """A short id for a MODEL_DIR's content (its manifest's file hashes), naming its scratch copy."""
    return hashlib.sha256((entry.local_dir / "manifest.json").read_bytes()).hexdigest()[:16]


def tools_id() -> str:
    """A short id for the device scripts' content: a changed script gets a fresh folder."""
    digest = hashlib.sha256()
    for script in DEVICE_SCRIPTS:
        digest.update(script.read_bytes())
    return digest.hexdigest()[:12]


def clean_scratch(host: str, connect: object, remote_root: str = "~/.edgeprune") -> str:
    """Remove bench's uploads (model copies, device scripts) from a device's ``scratch/``; say how much.

    Deployed releases and the runtime are elsewhere (deploy owns the layout) and stay. A sweep
    running on the device at the same time loses its copies: clean when no bench runs there.
    """
    from deploy.device import Device
    from deploy.errors import DeployError
    from deploy.release import scratch_dir
    from deploy.ssh_config import HostSpec

    try:
        with Device.connect(HostSpec.parse(host), connect) as device:
            scratch = scratch_dir(device.resolve_path(remote_root))
            if not device.is_dir(scratch):
                return f"{device.label}: nothing to clean ({scratch} does not exist)"
            usage = device.run(["du", "-sk", scratch], timeout=120, check=False).stdout.split()
            device.run(["rm", "-rf", "--", scratch], timeout=300)
    except DeployError as error:
        raise TargetError(str(error)) from None
    size = f" ({int(usage[0]) / 1024:.1f} MiB)" if usage and usage[0].isdigit() else ""
    return f"{device.label}: removed {scratch}{size}"


class LocalTarget:
    """This machine: every configuration is a subprocess of this one."""

    def __init__(self, python: Optional[str] = None) -> None:
        self.name = "local"
        self.spec = "local"
        self.python = python or sys.executable
        self.tools_dir = str(SUPERVISOR_SCRIPT.parent)
        self._process: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Check the Python to use exists."""
        from shutil import which

        if not (os.path.isfile(self.python) or which(self.python)):
            raise TargetError(f"local: no Python at {self.python}")

    def facts(self, quick: bool = False) -> Dict[str, object]:
        """This machine's facts, collected by the same probe a device runs."""
        argv = [self.python, str(PROBE_SCRIPT)] + (["--quick"] if quick else [])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise TargetError(f"local: the device facts probe did not run: {error}") from None
        if done.returncode != 0:
            raise TargetError(f"local: the device facts probe failed: {done.stderr.strip()[-300:]}")
        return parse_facts(done.stdout, "local")

    def stage(self, entry: ModelEntry) -> Tuple[str, Optional[Dict[str, object]]]:
        """A local MODEL_DIR runs where it is; a deployed name means nothing here."""
        if entry.local_dir is None:
            raise ModelDirError(f"{entry.label}: not a directory (the local target takes MODEL_DIR paths)")
        return str(entry.local_dir), None

    def bench(self, path: str, kernels: str, threads: int, options: BenchOptions) -> Dict[str, object]:
        """One configuration in a supervised subprocess; returns the supervisor's envelope."""
        argv = supervised_argv(self.python, self.tools_dir, options.timeout_s,
                               runtime_argv(self.python, path, kernels, threads, options))
        with self._lock:
            self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL, text=True)
        process = self._process
        try:
            stdout, stderr = process.communicate(timeout=options.timeout_s + SUPERVISOR_MARGIN_S)
        except subprocess.TimeoutExpired:
            self.abort()
            process.communicate()
            # The supervisor itself hung past its own limit: a timeout, whatever it managed to print.
            return timeout_envelope(f"local: the configuration did not finish in {options.timeout_s:g} s "
                                    "(nor its supervisor) and was killed")
        except BaseException:
            self.abort()  # Ctrl-C: SIGTERM lets the supervisor kill the benchmark's process group
            raise
        finally:
            with self._lock:
                self._process = None
        return parse_envelope(stdout, stderr, process.returncode)

    def abort(self) -> None:
        """Stop the running configuration (the supervisor kills the benchmark on SIGTERM)."""
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

    def close(self) -> None:
        """Nothing to release locally."""


class SshTarget:
    """A device over SSH, through ``deploy.device.Device`` (host keys, quoting, timeouts)."""

    def __init__(self, spec: str, connect_options: object, remote_root: str = "~/.edgeprune",
                 python: Optional[str] = None, wheelhouse: Optional[Path] = None) -> None:
        self.spec = spec
        self.wheelhouse = wheelhouse
        self.name = spec
        self.connect_options = connect_options
        self.remote_root = remote_root
        self.system_python = python
        self.device = None
        self.python: Optional[str] = None
        self.tools_dir: Optional[str] = None
        self._running = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Connect, make sure the runtime is installed, copy the device scripts to scratch."""
        from deploy.device import Device
        from deploy.ssh_config import HostSpec
        from deploy.errors import DeployError
        from deploy.release import scratch_dir
        from deploy.runtime_install import ensure_runtime

        try:
            self.device = Device.connect(HostSpec.parse(self.spec), self.connect_options)
            self.name = self.device.label
            self.root = self.device.resolve_path(self.remote_root)
            self.python = ensure_runtime(self.device, **self._runtime_kwargs())
            self.scratch = scratch_dir(self.root)  # deploy owns the remote layout
            self.device.run(["mkdir", "-p", self.scratch], timeout=30)
            self._prune_scratch()
            self.tools_dir = posixpath.join(self.scratch, f"bench-tools-{tools_id()}")
            if not self.device.is_dir(self.tools_dir):
                self._upload_atomically(self.tools_dir, lambda tmp: [
                    self.device.put(script, posixpath.join(tmp, script.name)) for script in DEVICE_SCRIPTS])
        except DeployError as error:
            raise TargetError(str(error)) from None

    def _prune_scratch(self) -> None:
        """Delete scratch copies (models, old device scripts) unused for SCRATCH_DAYS days.

        Bench uploads every local MODEL_DIR it measures into ``scratch/``; without this a device
        benchmarked often fills up. A copy in use is touched when staged, so it is never stale.
        """
        self.device.run(["find", self.scratch, "-mindepth", "1", "-maxdepth", "1", "-mtime", f"+{SCRATCH_DAYS}",
                         "-exec", "rm", "-rf", "--", "{}", "+"], timeout=120, check=False)

    def _runtime_kwargs(self) -> Dict[str, object]:
        kwargs: Dict[str, object] = {"remote_root": self.root}
        if self.system_python:
            kwargs["python"] = self.system_python
        if self.wheelhouse:
            kwargs["wheelhouse"] = Path(self.wheelhouse)
        return kwargs

    def _upload_atomically(self, final: str, upload) -> None:
        """Fill a temporary folder, then rename it to ``final``: a half upload is never used."""
        from deploy.errors import ConnectionLost, DeployError

        temp = f"{final}.tmp-{os.getpid()}-{threading.get_ident()}"
        self.device.run(["rm", "-rf", temp], timeout=60)
        self.device.mkdir(temp)
        try:
            upload(temp)
        except ConnectionLost:
            raise  # nothing can be removed over a dead connection
        except DeployError:
            # A full disk is the usual cause: a half upload left in scratch would keep it full.
            self.device.run(["rm", "-rf", temp], timeout=60, check=False)
            raise
        moved = self.device.run(["mv", "-T", temp, final], timeout=60, check=False)
        if not moved.ok:  # someone else (a parallel sweep) put it there first: theirs is as good
            self.device.run(["rm", "-rf", temp], timeout=60)

    def facts(self, quick: bool = False) -> Dict[str, object]:
        """The device's facts, from the probe run with the runtime's Python."""
        from deploy.errors import DeployError

        argv = [self.python, posixpath.join(self.tools_dir, PROBE_SCRIPT.name)] + (["--quick"] if quick else [])
        try:
            result = self.device.run(argv, timeout=60)
        except DeployError as error:
            raise TargetError(str(error)) from None
        return parse_facts(result.stdout, self.name)

    def stage(self, entry: ModelEntry) -> Tuple[str, Optional[Dict[str, object]]]:
        """Upload a local MODEL_DIR to scratch (once per content), or find a deployed model by name.

        Returns the path on the device and, for a deployed model, its manifest (sparsity, accuracy).
        """
        from deploy.errors import DeployError

        try:
            if entry.local_dir is None:
                from deploy.release import RemoteModel  # deploy owns the remote layout

                path = RemoteModel(self.device, self.root, entry.deployed_name).current_link
                text = self.device.read_text(posixpath.join(path, "manifest.json"))
                if text is None:
                    raise ModelDirError(f"{self.name}: no model named {entry.deployed_name!r} is deployed "
                                        f"under {self.root}/models (and no such local MODEL_DIR)")
                return path, parse_manifest(text, f"{self.name}:{path}")
            path = posixpath.join(self.scratch, f"model-{model_content_id(entry)}")
            if not self.device.is_dir(path):
                # What the manifest lists, manifest.json last; regular files inside the folder only
                # (an unlisted or symlinked file of a shared MODEL_DIR never leaves this machine).
                listed = sorted(name for name in entry.files if name != "manifest.json") + ["manifest.json"]
                self._upload_atomically(path, lambda tmp: self.device.put_listed(entry.local_dir, listed, tmp))
            else:
                self.device.run(["touch", "-c", path], timeout=30)  # in use: not pruned as stale
            return path, None
        except DeployError as error:
            raise TargetError(str(error)) from None

    def bench(self, path: str, kernels: str, threads: int, options: BenchOptions) -> Dict[str, object]:
        """One configuration on the device under the supervisor; returns its envelope.

        TargetTimeout when it (or the device) hung past every limit; TargetError when the connection dropped.
        """
        from deploy.errors import DeployError, RemoteTimeout

        argv = supervised_argv(self.python, self.tools_dir, options.timeout_s,
                               runtime_argv(self.python, path, kernels, threads, options))
        try:
            with self._lock:
                self._running = self.device.start(argv, timeout=options.timeout_s + SUPERVISOR_MARGIN_S)
            result = self._running.wait()
        except RemoteTimeout as error:
            raise TargetTimeout(str(error)) from None  # hung: the configuration, or the whole device
        except DeployError as error:
            raise TargetError(str(error)) from None
        finally:
            with self._lock:
                self._running = None
        return parse_envelope(result.stdout, result.stderr, result.exit_status, result.cut_note())

    def abort(self) -> None:
        """Drop the connection now, from any thread (Ctrl-C), without waiting for the device.

        The configuration running there dies with it: its supervisor kills the benchmark once the
        session that started it is gone, and commands under a deploy lock are ended by the holder.
        """
        if self.device is not None:
            self.device.abort()
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self.device is not None:
            self.device.close()
