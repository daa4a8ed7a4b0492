"""RUN_DIR: where a compression run lives on disk, and the API other packages read it with.

Layout (ARCHITECTURE.md is the contract)::

    RUN_DIR/config.json, metrics.json, report.md, sparsity_accuracy.png
    RUN_DIR/dense/{checkpoint.pt, final.pt, rewind.pt}     level 0, shared by every method
    RUN_DIR/METHOD/level_K/{checkpoint.pt, final.pt}        K = 1, 2, ...

``final.pt`` existing means the level is done, which is all resumption needs to know. ``rewind.pt``
(the dense weights at ``--rewind-epoch``) is an addition for weight rewinding.

Readers: :func:`list_levels` and :func:`load_level`. The writer: :class:`RunDir`, whose
``writer`` flag is the single place that decides whether this process writes files (under DDP only
rank 0 will).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from compressor import checkpoints
from compressor.config import config_differences
from compressor.errors import CompressorError, RunDirError, UntrustedFactoryError
from compressor.train.models import build_model, factory_record, file_sha256, input_shape_of, is_factory_spec

CONFIG = "config.json"
METRICS = "metrics.json"
FINAL = "final.pt"
CHECKPOINT = "checkpoint.pt"
REWIND = "rewind.pt"
DENSE = "dense"
LOCK = ".edgeprune.lock"  # held (flock) by the process writing the run; the kernel frees it if that dies
# The temporary files of checkpoints.atomic_* (".NAME.RANDOM.tmp"): a killed run leaves them behind.
_STALE_TEMP = re.compile(r"\.(checkpoint\.pt|final\.pt|rewind\.pt|config\.json|metrics\.json|report\.md"
                         r"|sparsity_accuracy\.png|latency_table\.json)\.[A-Za-z0-9_]+\.tmp")
log = logging.getLogger("compressor")


class RunDir:
    """Paths of one RUN_DIR and the only door through which files are written into it."""

    def __init__(self, root: Path, writer: bool = True) -> None:
        self.root = Path(root)
        self.writer = writer

    def level_dir(self, method: str, level: int) -> Path:
        """``dense/`` for level 0, ``METHOD/level_K/`` otherwise."""
        return self.root / DENSE if level == 0 else self.root / method / f"level_{level}"

    def final_path(self, method: str, level: int) -> Path:
        return self.level_dir(method, level) / FINAL

    def checkpoint_path(self, method: str, level: int) -> Path:
        return self.level_dir(method, level) / CHECKPOINT

    @property
    def rewind_path(self) -> Path:
        return self.root / DENSE / REWIND

    def prepare(self, record: Dict[str, Any], resume: bool) -> None:
        """Start a new run (an empty or missing RUN_DIR) or check that ``--resume`` continues this one.

        Never touches a folder that holds anything else: a non-empty RUN_DIR without ``--resume`` and
        a RUN_DIR whose config differs are refused before any file is written.
        """
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"{self.root} exists and is not a directory")
        config_path = self.root / CONFIG
        non_empty = self.root.is_dir() and any(entry.name != LOCK for entry in self.root.iterdir())
        if non_empty and not resume:
            raise RunDirError(f"{self.root} is not empty; continue it with --resume or choose another --out")
        if non_empty:
            if not config_path.is_file():
                raise RunDirError(f"{self.root} is not an edgeprune run (no {CONFIG}); refusing to touch it")
            saved = read_json(config_path)
            differences = config_differences(saved, record)
            if differences:
                raise RunDirError(f"--resume with a different config than {config_path}: " + "; ".join(differences))
            return
        if self.writer:
            self.root.mkdir(parents=True, exist_ok=True)
            checkpoints.atomic_write_text(json.dumps(record, indent=2) + "\n", config_path)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Be the only writer of this RUN_DIR while the block runs (a second ``compress --resume`` on it
        is refused with who holds it, instead of redoing the same levels beside the first).

        ``flock`` on ``RUN_DIR/.edgeprune.lock``: released by the kernel when the holder exits, even by
        SIGKILL, so a killed run never leaves a stale lock behind.
        """
        import fcntl

        if not self.writer:
            yield
            return
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"{self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            raise RunDirError(f"cannot lock {self.root / LOCK}: {error.strerror or error}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunDirError(f"{self.root} is being written by {holder}; wait for it to finish "
                                  "(or stop it) before --resume") from None
            os.ftruncate(fd, 0)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def remove_stale_temp_files(self) -> List[Path]:
        """Delete the temporary files a killed writer left in RUN_DIR's own folders; return them.

        Only names that ``checkpoints.atomic_*`` creates, only in the folders of the layout, never
        through a symlink: a RUN_DIR is the user's folder, and nothing else in it is ours to delete.
        Call it only while holding the run (:meth:`hold`): another writer's temp files look the same.
        """
        removed = []
        if not self.writer:
            return removed
        for folder in self._own_folders():
            for entry in folder.iterdir():
                if _STALE_TEMP.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                    entry.unlink(missing_ok=True)
                    removed.append(entry)
        return removed

    def _own_folders(self) -> List[Path]:
        """RUN_DIR, dense/ and every METHOD/level_K/ that is a real folder (not a symlink)."""
        if not self.root.is_dir():
            return []
        folders = [self.root, self.root / DENSE]
        for method_dir in self.root.iterdir():
            if method_dir.is_dir() and not method_dir.is_symlink():
                folders += list(method_dir.glob("level_*"))
        return [f for f in folders if f.is_dir() and (f == self.root or not f.is_symlink())]

    def save(self, obj: Any, path: Path) -> None:
        """Atomically save a checkpoint, if this process is the writer."""
        if self.writer:
            checkpoints.atomic_save(obj, path)

    def write_text(self, text: str, name: str) -> None:
        """Atomically write ``RUN_DIR/name``, if this process is the writer."""
        if self.writer:
            checkpoints.atomic_write_text(text, self.root / name)

    def remove(self, path: Path) -> None:
        """Delete a file (a finished level's epoch checkpoint), if this process is the writer."""
        if self.writer:
            path.unlink(missing_ok=True)


def read_json(path: Path) -> Dict[str, Any]:
    """A JSON object from ``path``, or ``RunDirError``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise RunDirError(f"{path} not found: is {Path(path).parent} an edgeprune RUN_DIR?") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise RunDirError(f"{path} does not hold a JSON object")
    return data


def model_fields(name: str) -> Dict[str, Any]:
    """config.json's ``model`` (a factory's path made absolute) and, for a factory, ``model_sha256``."""
    spec, sha = factory_record(name)
    return {"model": spec, "model_sha256": sha} if sha else {"model": spec}


def level_record(final: Dict[str, Any]) -> Dict[str, Any]:
    """The metrics.json entry for one level, from its ``final.pt`` contents.

    A non-finite number (a level saved by an older version from a diverged run) becomes ``None``, so
    metrics.json stays strict JSON.
    """
    record = {key: _finite_or_none(final[key]) for key in ("level", "sparsity", "accuracy", "loss", "epochs", "seconds")}
    # --structure channels levels also carry the smaller network's size and each layer's width.
    if "sparsity_all" in final:  # zeros among all parameters, beside "sparsity" (the prunable weights')
        record["sparsity_all"] = _finite_or_none(final["sparsity_all"])
    record.update({key: final[key] for key in STRUCTURED_FIGURES if key in final})
    if isinstance(final.get("test_examples"), int):  # the accuracy's resolution: 1 example = 100/N points
        record["test_examples"] = final["test_examples"]
    return record


STRUCTURED_FIGURES = ("params", "macs", "macs_removed", "widths", "predicted_speedup", "predicted_ms",
                      "table_speedup", "table_ms", "measured_ms", "measured_dense_ms", "measured_speedup",
                      "blocks_removed")


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def collect_metrics(run: RunDir, cache: Optional[Dict[Path, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """metrics.json's content, rebuilt from the ``final.pt`` files (the single source of truth).

    ``cache`` (path → level record) spares re-reading every finished level after each new one.
    """
    cache = {} if cache is None else cache

    def record(path: Path) -> Dict[str, Any]:
        if path not in cache:
            cache[path] = level_record(checkpoints.load(path))
        return cache[path]

    config = read_json(run.root / CONFIG)
    methods: Dict[str, List[Dict[str, Any]]] = {}
    dense_path = run.final_path("dense", 0)
    dense = record(dense_path) if dense_path.is_file() else None
    for method in config["methods"]:
        levels = [dict(dense)] if dense else []
        level = 1
        while run.final_path(method, level).is_file():
            levels.append(dict(record(run.final_path(method, level))))
            level += 1
        methods[method] = levels
    return {"model": config["model"], "data": config["data"], "input_shape": config.get("input_shape"),
            "methods": methods}


class LevelInfo(NamedTuple):
    """One finished level as :func:`list_levels` reports it."""

    method: str
    level: int
    sparsity: float
    accuracy: float
    path: Path


@dataclass
class LoadedLevel:
    """A finished level, its model built, loaded and in eval mode."""

    model: nn.Module
    method: str
    level: int
    sparsity: float
    accuracy: float
    model_name: str
    input_shape: Optional[Tuple[int, ...]]
    mask: Dict[str, torch.Tensor]


def list_levels(run_dir: Path) -> List[LevelInfo]:
    """Every finished level of every method, in run order (level 0 = the dense network, per method)."""
    run = RunDir(Path(run_dir), writer=False)
    if not run.root.is_dir():
        raise RunDirError(f"RUN_DIR not found: {run.root}")
    metrics = read_json(run.root / METRICS)
    try:
        return [
            # accuracy is null for a run under a regression loss (no accuracy to speak of)
            LevelInfo(method, int(entry["level"]), float(entry["sparsity"]),
                      float("nan") if entry["accuracy"] is None else float(entry["accuracy"]),
                      run.final_path(method, int(entry["level"])))
            for method, levels in metrics["methods"].items() for entry in levels
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RunDirError(f"{run.root / METRICS} is not an edgeprune metrics file ({error})") from error


ModelChoice = Union[nn.Module, str, None]


def load_level(run_dir: Path, method: Optional[str] = None, level: Optional[int] = None,
               model: ModelChoice = None, trust_factory: bool = False) -> LoadedLevel:
    """Load one level of a run: by default the first method's last finished level.

    A built-in model is rebuilt from the run's model name. A run made with a user factory
    (``file.py:factory``) names a Python file, and reading a run never runs a file the run names:
    pass ``model`` (an instance of the same architecture, or a ``file.py:factory`` / built-in name
    you choose), or ``trust_factory=True`` to run the recorded file if its sha256 still matches the
    record. Otherwise :class:`UntrustedFactoryError` says which file and how to trust it.
    """
    levels = list_levels(run_dir)
    if not levels:
        raise RunDirError(f"{run_dir} has no finished level yet")
    method = method or levels[0].method
    of_method = [info for info in levels if info.method == method]
    if not of_method:
        methods = sorted({info.method for info in levels})
        raise RunDirError(f"{run_dir} has no method {method!r}; it has {', '.join(methods)}")
    chosen = of_method[-1] if level is None else next((i for i in of_method if i.level == level), None)
    if chosen is None:
        have = ", ".join(str(i.level) for i in of_method)
        raise RunDirError(f"{run_dir} has no finished level {level} for {method}; finished: {have}")
    config = read_json(Path(run_dir) / CONFIG)
    model_name = str(config.get("model"))
    final = checkpoints.load(chosen.path)  # checked before any model code runs
    model = rebuild_model(Path(run_dir), config, model, trust_factory)
    if "channels" in final:  # a structured level: the factory's dense model without its blocks, shrunk to the plan
        model = _shrunken(model, final, config, chosen.path)
    checkpoints.load_into(model, final["model"], str(chosen.path))
    model.eval()
    shape = input_shape_of(model) or (tuple(config["input_shape"]) if config.get("input_shape") else None)
    return LoadedLevel(model, method, chosen.level, float(final["sparsity"]), float(final["accuracy"]),
                       model_name, shape, dict(final.get("mask", {})))


def rebuild_model(run_dir: Path, config: Dict[str, Any], model: ModelChoice = None,
                  trust_factory: bool = False) -> nn.Module:
    """The run's network, built under the trust rule of :func:`load_level`."""
    if isinstance(model, nn.Module):
        return model
    recorded, recorded_sha = str(config.get("model")), config.get("model_sha256")
    if isinstance(model, str):
        return _build_named(model, recorded, recorded_sha)
    if not is_factory_spec(recorded):
        try:
            return build_model(recorded)
        except CompressorError as error:
            raise RunDirError(f"cannot rebuild model {recorded!r} ({error}); pass the model: --model "
                              "NAME_OR_FILE.py:FACTORY (Python: load_level(..., model=...))") from error
    if trust_factory:
        return _build_trusted(recorded, recorded_sha)
    sha = f"sha256 {recorded_sha}" if recorded_sha else "no sha256 recorded"
    raise UntrustedFactoryError(
        f"{run_dir / CONFIG} names the model factory {recorded} ({sha}); edgeprune never runs a file that a "
        f"RUN_DIR names: if you trust that file, pass --model {recorded} "
        "(Python: load_level(..., model=...) or trust_factory=True)")


def _build_named(spec: str, recorded: str, recorded_sha: Optional[str]) -> nn.Module:
    """Build the model the user named; one warning line if it is not what the run recorded."""
    named, sha = factory_record(spec)
    model = build_model(spec, expect_sha256=sha)  # first: a name that cannot be built is one error line
    if sha is not None and recorded_sha is not None and sha != recorded_sha:
        log.warning(f"warning: {named} (sha256 {sha}) is not the file this run was made with ({recorded}, "
                    f"sha256 {recorded_sha}); building the model from the file you named")
    elif sha is None and named != recorded:
        log.warning(f"warning: building {named} as you asked; this run was made with {recorded}")
    return model


def _build_trusted(recorded: str, recorded_sha: Optional[str]) -> nn.Module:
    """``trust_factory=True``: run the recorded file only if it is, byte for byte, the one recorded."""
    path = Path(recorded.rpartition(":")[0])
    if not recorded_sha or not path.is_absolute():
        raise UntrustedFactoryError(f"the run records no absolute path and sha256 for {recorded}; name the "
                                    "file yourself: --model FILE.py:FACTORY (Python: model=...)")
    if not path.is_file():
        raise RunDirError(f"the run's model factory file is not here: {path}; pass --model FILE.py:FACTORY")
    sha = file_sha256(path)
    if sha != recorded_sha:
        raise UntrustedFactoryError(f"{path} changed since the run was made (sha256 now {sha}, recorded "
                                    f"{recorded_sha}); to build from it anyway, name it: --model {recorded} "
                                    "(Python: model=...)")
    return build_model(recorded, expect_sha256=recorded_sha)
def _shrunken(model: nn.Module, final: Dict[str, Any], config: Dict[str, Any], path: Path) -> nn.Module:
    """The dense ``model`` with the blocks and channels that ``final``'s plan drops removed
    (deterministically: the same steps as the run took)."""
    from compressor.prune.blocks import decode_blocks, find_blocks, remove_blocks
    from compressor.prune.channels import decode, find_groups, full_plan, shrink
    from compressor.prune.examples import example_input, is_example

    example = final.get("example")  # what the run traced with (one example of its data)
    if not is_example(example):  # runs before the example was stored: seeded noise of the input shape
        shape = input_shape_of(model) or (tuple(config["input_shape"]) if config.get("input_shape") else None)
        if not shape:
            raise RunDirError(f"{path}: a structured level needs the run's example inputs or input shape, "
                              "which it does not record")
        example = example_input(shape)
    exclude = tuple(config.get("exclude") or ())
    if final.get("blocks_removed"):
        blocks = find_blocks(model, example, exclude)
        remove_blocks(model, blocks, decode_blocks(final["blocks_removed"], blocks, str(path)))
    if not final["channels"]:  # --structure blocks: no channel groups to shrink
        return model
    groups = find_groups(model, example, exclude)
    return shrink(model, full_plan(groups), decode(final["channels"], groups, str(path)), example)
