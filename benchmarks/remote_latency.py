"""Latency measured on a device over SSH, through the runtime ``edgeprune deploy`` installs there.

``RemoteLatency`` is a latency source (``describe``/``table``/``time_networks``, the contract of
``compressor.prune.latency.LatencySource``) for ``compress --latency-on user@host`` and ``bench
--latency-table``. Each step is one connection: connect (deploy's host-key and key options), take the
deploy lock on the remote root (so no deploy switches or prunes the runtime while it measures, and a
dropped connection ends what we started), make sure this checkout's runtime is installed (the first
time only), then run ``VENV/bin/python -m edge_runtime.layer_timing`` there with a device-side
timeout. Its answer (a table, network times) is read back bounded and validated like any file from
elsewhere. Compress can run for hours between two steps: nothing is held open in between.

``cached_remote`` wraps it in the user cache (``compressor.prune.latency_cache``), keyed by the
fingerprint the device reports, so a second run on the same device measures nothing.
"""

from __future__ import annotations

import json
import posixpath
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

from edge_runtime.wording import counted
from edge_runtime.layer_timing import (MAX_BYTES, LatencyTable, LatencyTableError, LayerShape, parse_network_times,
                                       parse_table)

Log = Callable[[str], None]
FINGERPRINT_TIMEOUT_S = 120.0


class RemoteLatencyError(LatencyTableError):
    """The device could not be reached or prepared, or measuring there failed (one line)."""


class RemoteLatency:
    """Tables and network times measured on ``spec`` (``[USER@]HOST[:PORT]``); see the module docstring."""

    def __init__(self, spec: str, connect_options: Any, remote_root: str = "~/.edgeprune", python: str = "python3",
                 wheelhouse: Optional[Path] = None, timeout_s: float = 3600.0, rounds: int = 5, runs: int = 20,
                 log: Optional[Log] = None) -> None:
        self.spec, self.connect_options = spec, connect_options
        self.remote_root, self.system_python, self.wheelhouse = remote_root, python, wheelhouse
        self.timeout_s, self.rounds, self.runs = timeout_s, rounds, runs
        self.log = log or (lambda message: None)
        self.python: Optional[str] = None  # the runtime's python, once installed
        self.label = spec
        self.steps = 0  # measurements run on the device (tests count them)

    def describe(self) -> str:
        return self.label

    def fingerprint(self) -> str:
        """The device's ``layer_timing.device_fingerprint()`` (its CPU, cores, onnxruntime and numpy)."""
        with self._session() as (device, _work):
            result = device.run(self._tool("--fingerprint"), timeout=FINGERPRINT_TIMEOUT_S)
        try:
            answer = json.loads(result.stdout.strip().splitlines()[-1])
            assert isinstance(answer, dict) and isinstance(answer.get("device"), str) and answer["device"]
        except (ValueError, IndexError, AssertionError):
            raise RemoteLatencyError(f"{self.label}: the runtime printed no device fingerprint: "
                                     f"{result.stdout.strip()[:120]!r}") from None
        return answer["device"][:500]

    def table(self, shapes: Sequence[LayerShape], engine: str, threads: int) -> LatencyTable:
        """Upload the shapes, measure them there, read the table back (bounded) and check it."""
        unique = list({s.key(): s for s in shapes}.values())
        with self._session() as (device, work):
            device.write_text(posixpath.join(work, "shapes.json"),
                              json.dumps({"shapes": [s.to_dict() for s in unique]}) + "\n")
            out = posixpath.join(work, "table.json")
            self.log(f"{self.label}: measuring {len(unique)} layer shapes ({engine}, {counted(threads, 'thread')})")
            self._measure(device, self._tool("--shapes", posixpath.join(work, "shapes.json"), "--engine", engine,
                                             "--threads", str(threads), "--out", out))
            table = parse_table(self._read_json(device, out), f"{self.label}: the measured table")
        if (table.engine, table.threads) != (engine, threads) or table.missing(unique):
            raise RemoteLatencyError(f"{self.label}: the device returned a table for another engine, thread count "
                                     f"or shapes than asked")
        return table

    def time_networks(self, models: Sequence[bytes], threads: int) -> List[float]:
        """Upload the ONNX networks, time them there (interleaved), return their milliseconds."""
        with self._session() as (device, work), tempfile.TemporaryDirectory(prefix="edgeprune-nets-") as local:
            names = []
            for index, model in enumerate(models):
                path = Path(local) / f"net{index}.onnx"  # our own fresh folder: nothing else is in it
                path.write_bytes(bytes(model))
                names.append(posixpath.join(work, path.name))
                device.put(path, names[-1])
            out = posixpath.join(work, "times.json")
            self._measure(device, self._tool("--networks", *names, "--threads", str(threads), "--out", out))
            return parse_network_times(self._read_json(device, out), f"{self.label}: network times", len(models))

    # ---- one step: connection, lock, runtime, scratch folder ----------------------------------------

    def _tool(self, *args: str) -> List[str]:
        assert self.python is not None
        return [self.python, "-m", "edge_runtime.layer_timing", *args,
                *(["--rounds", str(self.rounds), "--runs", str(self.runs)] if "--fingerprint" not in args else [])]

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """Connect, lock the remote root, install the runtime if needed, yield (device, scratch folder);
        every deploy error becomes one ``RemoteLatencyError`` line."""
        from deploy.device import Device, temp_stamp
        from deploy.ssh_config import HostSpec
        from deploy.errors import DeployError
        from deploy.release import scratch_dir
        from deploy.root_lock import hold_root_lock

        try:
            with Device.connect(HostSpec.parse(self.spec), self.connect_options) as device:
                self.label = device.label
                root = device.resolve_path(self.remote_root)
                device.run(["mkdir", "-p", root], timeout=60)
                with hold_root_lock(device, root, self.log):
                    self._ensure_runtime(device, root)
                    work = posixpath.join(scratch_dir(root), f"latency-{temp_stamp()}")
                    device.run(["mkdir", "-p", work], timeout=60)
                    try:
                        yield device, work
                    finally:
                        device.run(["rm", "-rf", "--", work], timeout=60, check=False)
        except DeployError as error:
            raise RemoteLatencyError(f"--latency-on: {error}") from None

    def _ensure_runtime(self, device: Any, root: str) -> None:
        """This checkout's runtime on the device (installed the first time; found again after that)."""
        from deploy.runtime_install import ensure_runtime

        if self.python is not None and device.run(["test", "-x", self.python], timeout=60, check=False).ok:
            return
        kwargs = {"wheelhouse": Path(self.wheelhouse)} if self.wheelhouse else {}
        self.python = ensure_runtime(device, python=self.system_python, remote_root=root, log=self.log, **kwargs)

    def _measure(self, device: Any, argv: List[str]) -> None:
        """Run the measuring tool with the device-side timeout; its one-line refusal becomes ours."""
        from deploy.errors import RemoteTimeout

        self.steps += 1
        try:
            result = device.run(argv, timeout=self.timeout_s, check=False)
        except RemoteTimeout as error:
            raise RemoteLatencyError(f"{self.label}: measuring took longer than {self.timeout_s:g} s: {error}") from None
        if not result.ok:
            last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
            raise RemoteLatencyError(f"{self.label}: measuring failed ({result.describe()}): {last[:300]}")

    def _read_json(self, device: Any, remote: str) -> Any:
        """A small regular file from the device, at most ``MAX_BYTES``, parsed (never trusted)."""
        try:
            with device.answering(f"SFTP: read {remote}"):
                attributes = device.sftp.lstat(remote)
                if not stat.S_ISREG(attributes.st_mode or 0) or (attributes.st_size or 0) > MAX_BYTES:
                    raise RemoteLatencyError(f"{self.label}: {remote} is not a regular file of at most "
                                             f"{MAX_BYTES} bytes")
                with device.sftp.open(remote, "rb") as handle:
                    data = handle.read(MAX_BYTES + 1)
        except OSError as error:  # SFTP: missing, unreadable
            raise RemoteLatencyError(f"{self.label}: cannot read {remote}: {error}") from None
        if len(data) > MAX_BYTES:
            raise RemoteLatencyError(f"{self.label}: {remote} is larger than {MAX_BYTES} bytes")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RemoteLatencyError(f"{self.label}: {remote} is not valid JSON") from None


def cached_remote(source: RemoteLatency, cache_folder: Optional[Path] = None) -> Any:
    """``source`` behind the user cache of tables, keyed by the device's own fingerprint."""
    from compressor.prune.latency_cache import CachedLatency, LatencyCache

    return CachedLatency(source, source.fingerprint, LatencyCache(cache_folder) if cache_folder else None)


def cached_local(cache_folder: Optional[Path] = None) -> Any:
    """This machine, in-process, behind the same cache."""
    from compressor.prune.latency import LocalLatency
    from compressor.prune.latency_cache import CachedLatency, LatencyCache
    from edge_runtime.layer_timing import device_fingerprint

    return CachedLatency(LocalLatency(), device_fingerprint, LatencyCache(cache_folder) if cache_folder else None)


def latency_source(target: str, args: Any, log: Optional[Log] = None) -> Any:
    """The cached source a ``--latency-on TARGET`` names: ``local``, or ``[USER@]HOST[:PORT]`` reached with
    deploy's connection flags in ``args`` (``--identity-file``, ``--known-hosts``, ``--timeout``, ...)."""
    if target == "local":
        return cached_local()
    from deploy.cli_options import connect_options
    from deploy.ssh_config import HostSpec
    from deploy.errors import DeployError

    try:
        HostSpec.parse(target)
        options = connect_options(args)
    except DeployError as error:
        raise RemoteLatencyError(f"--latency-on: {error}") from None
    return cached_remote(RemoteLatency(target, options, remote_root=args.remote_root, python=args.python or "python3",
                                       wheelhouse=getattr(args, "wheelhouse", None), log=log))
