"""A user cache of latency tables: a device measured once is not measured again for the same shapes.

Measuring a table on a Pi takes a minute or more, and every ``compress --latency-on`` of the same model
on the same device asks for the same shapes. A table's times depend on the device (CPU model and
flags, cores), the onnxruntime and numpy versions (all in ``layer_timing.device_fingerprint()``), the
engine (fp32 or int8) and the thread count: that is the cache key, one file per key under
``$XDG_CACHE_HOME/edgeprune/latency/`` (default ``~/.cache/edgeprune/latency/``). An entry grows: a
later run that needs more shapes measures only those and adds them.

Cache files are untrusted like any file (another user's planted link, a truncated write, a table of
another device put under this key): read bounded and regular-only, fully validated, and a bad one is
ignored with one warning and measured again; writes are atomic and never through a link.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.layer_timing import LatencyTable, LayerShape, check_for_planning, read_table
from edge_runtime.safe_io import atomic_write_text

log = logging.getLogger("compressor")


def cache_dir() -> Path:
    """Where cached tables live: ``$XDG_CACHE_HOME/edgeprune/latency`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "edgeprune" / "latency"


def cache_key(device: str, engine: str, threads: int) -> str:
    """The file name of one (device fingerprint, engine, threads) entry."""
    return hashlib.sha256(json.dumps([device, engine, threads]).encode()).hexdigest()[:32] + ".json"


class LatencyCache:
    """Tables by (device fingerprint, engine, threads) in one folder (see the module docstring)."""

    def __init__(self, folder: Optional[Path] = None) -> None:
        self.folder = Path(folder) if folder is not None else cache_dir()

    def path(self, device: str, engine: str, threads: int) -> Path:
        return self.folder / cache_key(device, engine, threads)

    def load(self, device: str, engine: str, threads: int) -> Optional[LatencyTable]:
        """The cached table for this key, or None (absent, unreadable, malformed, or for another key)."""
        path = self.path(device, engine, threads)
        if not os.path.lexists(path):
            return None
        try:
            table = read_table(path, "cached latency table")
        except EdgeRuntimeError as error:
            log.warning(f"{error}; ignored, measuring again")
            return None
        if (table.device, table.engine, table.threads) != (device, engine, threads):
            log.warning(f"cached latency table {path} is for another device, engine or thread count; ignored, "
                        f"measuring again")
            return None
        return table

    def store(self, table: LatencyTable) -> None:
        """Write ``table`` under its own key (atomically; a cache that cannot be written is only a warning)."""
        path = self.path(table.device, table.engine, table.threads)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if path.is_symlink():  # planted in our own cache: removed (unlink never follows a link)
                path.unlink()
            atomic_write_text(path, table.to_json())
        except (OSError, EdgeRuntimeError) as error:
            log.warning(f"cannot cache the latency table in {path.parent} ({error}); it will be measured again")


class CachedLatency:
    """A latency source (``describe``/``table``/``time_networks``) whose tables come from the cache when
    this device already measured the shapes, and are measured by ``source`` (only the missing shapes)
    otherwise. ``fingerprint()`` names the device as ``layer_timing.device_fingerprint`` does there;
    ``measured`` lists the shape counts ``source`` was asked for (tests assert on it, never on time)."""

    def __init__(self, source, fingerprint: Callable[[], str], cache: Optional[LatencyCache] = None) -> None:
        self.source, self.fingerprint = source, fingerprint
        self.cache = cache or LatencyCache()
        self.measured: List[int] = []

    def describe(self) -> str:
        return self.source.describe()

    def table(self, shapes: Sequence[LayerShape], engine: str, threads: int) -> LatencyTable:
        """The table of ``shapes`` on the device: cached, extended with what is missing, or measured."""
        needed: Dict[str, LayerShape] = {s.key(): s for s in shapes}
        device = self.fingerprint()
        cached = self.cache.load(device, engine, threads)
        missing = [s for key, s in needed.items() if cached is None or key not in cached.ms]
        if missing:
            measured = self._measure(missing, engine, threads)
            if cached is not None and measured.device == device:
                cached = replace(cached, ms={**cached.ms, **measured.ms})
            elif len(missing) < len(needed):  # the device changed since its fingerprint: all afresh
                cached = self._measure(list(needed.values()), engine, threads)
            else:
                cached = measured
            # a table unfit to plan with (flat, inverted, incomplete) is refused now and never cached
            check_for_planning(cached, list(needed.values()), f"the table measured on {self.describe()}")
            self.cache.store(cached)
        else:
            log.info(f"latency table for {len(needed)} shapes from the cache ({self.cache.path(device, engine, threads)})")
        return replace(cached, ms={key: cached.ms[key] for key in needed if key in cached.ms})

    def _measure(self, shapes: Sequence[LayerShape], engine: str, threads: int) -> LatencyTable:
        self.measured.append(len(shapes))
        return self.source.table(shapes, engine, threads)

    def time_networks(self, models: Sequence[bytes], threads: int) -> List[float]:
        return self.source.time_networks(models, threads)
