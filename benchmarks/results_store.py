"""results.json: every raw figure of a sweep, rewritten atomically as each configuration finishes.

Written after every result (an exclusive temp file + a rename), so a sweep that is interrupted, or a
workstation that loses power, leaves a complete, valid results.json with everything measured so far.
Several hosts report from their own threads; one lock serialises the writes.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.errors import ResultsError
from edge_runtime.safe_io import atomic_write_text

FORMAT = "edgeprune-bench"
FORMAT_VERSION = 1


def now() -> str:
    """The current UTC time as ISO 8601 text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomically(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` through ``safe_io.atomic_writer``: an exclusive, no-follow temp
    file beside it (mode 0666 less the umask: results are for sharing), renamed over a ``path`` that is
    not a link; a failed write leaves no temp file."""
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    atomic_write_text(path, text)


def load_results(path: Path) -> Dict[str, object]:
    """Read a results.json written by a sweep; ResultsError when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ResultsError(f"{path}: cannot read results ({error})") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ResultsError(f"{path}: not an edgeprune bench results file")
    return data


class ResultsStore:
    """The sweep's results in memory, mirrored to ``out_dir/results.json`` on every change."""

    def __init__(self, out_dir: Path, settings: Dict[str, object], models: List[Dict[str, object]],
                 hosts: Dict[str, str]) -> None:
        self.path = Path(out_dir) / "results.json"
        self._lock = threading.Lock()
        self.data: Dict[str, object] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "started": now(), "finished": None, "complete": False, "interrupted": False,
            "settings": settings, "models": models,
            "hosts": {name: {"target": spec, "facts_before": None, "facts_after": None,
                             "error": None} for name, spec in hosts.items()},
            "results": [],
        }
        self._save()

    def add_result(self, record: Dict[str, object]) -> None:
        """Append one configuration's record and save."""
        with self._lock:
            self.data["results"].append(record)
            self._save()

    def set_host(self, host: str, **fields: object) -> None:
        """Record facts (``facts_before``/``facts_after``) or an ``error`` for a host, and save."""
        with self._lock:
            self.data["hosts"][host].update(fields)
            self._save()

    def set_models(self, models: List[Dict[str, object]]) -> None:
        """Replace the models' descriptions (figures learned from the devices), and save."""
        with self._lock:
            self.data["models"] = models
            self._save()

    def finish(self, interrupted: bool = False, warnings: Optional[List[str]] = None) -> None:
        """Mark the sweep finished (or interrupted) and save a last time."""
        with self._lock:
            self.data.update(finished=now(), complete=not interrupted, interrupted=interrupted,
                             warnings=list(warnings or []))
            self._save()

    def _save(self) -> None:
        try:
            write_json_atomically(self.path, self.data)
        except OSError as error:
            raise ResultsError(f"cannot write {self.path}: {error}") from error
