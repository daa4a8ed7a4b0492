"""``edgeprune bench TARGET --run RUN_DIR``: export the levels of a compress run as MODEL_DIRs.

Needs torch (the export goes through PyTorch's ONNX exporter), so the CLI imports this module only
when ``--run`` is given. Level 0 (the dense network) is shared by every method and exported once; it
is the sweep's reference. Exports land in ``OUT/models/`` and are reused when a sweep is run again.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Set

from benchmarks.errors import BenchError


def parse_levels(text: str) -> Optional[Set[int]]:
    """``all`` → None (every level); ``0,3,5`` → {0, 3, 5}."""
    if text.strip().lower() == "all":
        return None
    try:
        levels = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise BenchError(f"--levels: expected all or levels like 0,3,5, got {text!r}") from None
    if not levels or min(levels) < 0:
        raise BenchError(f"--levels: expected all or levels like 0,3,5, got {text!r}")
    return levels


def export_levels(run_dir: Path, levels_text: str, out_dir: Path, model: Optional[str] = None) -> List[Path]:
    """Export the chosen finished levels of ``run_dir`` under ``out_dir/models``; return the MODEL_DIRs.

    ``model`` (``--model``): the built-in name or ``file.py:factory`` to build the network from; a run
    made with a factory file needs it (reading a run never runs a file the run names).
    """
    from compressor.errors import CompressorError
    from compressor.export.model_dir import export_model
    from compressor.export.from_run import structure_family
    from compressor.run.run_dir import CONFIG, list_levels, load_level, read_json

    wanted = parse_levels(levels_text)
    try:
        infos = list_levels(Path(run_dir))
    except CompressorError as error:
        raise BenchError(str(error)) from None
    chosen, seen_dense = [], False
    for info in infos:
        if wanted is not None and info.level not in wanted:
            continue
        if info.level == 0:  # every method starts from the same dense network
            if seen_dense:
                continue
            seen_dense = True
        chosen.append(info)
    if not chosen:
        have = sorted({info.level for info in infos})
        raise BenchError(f"{run_dir}: no finished level matches --levels {levels_text} (finished: {have})")
    model_dirs = []
    for info in chosen:
        name = "dense" if info.level == 0 else f"{info.method}-level{info.level}"
        target = Path(out_dir) / "models" / name
        if not _exported_from(target, run_dir, info):
            try:
                loaded = load_level(Path(run_dir), info.method, info.level, model=model)
                export_model(loaded.model, target, input_shape=loaded.input_shape, accuracy=loaded.accuracy,
                             sparsity=loaded.sparsity, force=True,
                             source={"run_dir": str(Path(run_dir).resolve()), "model": loaded.model_name,
                                     "method": "dense" if info.level == 0 else info.method,
                                     "level": info.level,
                                     **structure_family(run_dir, read_json(Path(run_dir) / CONFIG))})
            except CompressorError as error:
                raise BenchError(f"exporting {info.method} level {info.level}: {error}") from None
        model_dirs.append(target)
    return model_dirs


def _exported_from(model_dir: Path, run_dir: Path, info) -> bool:
    """Whether ``model_dir`` already holds this level of this run (an --out reused with --overwrite may
    hold another run's export under the same name: that one is exported again, never measured)."""
    import json

    try:
        manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
        source = manifest["source"]
        return (source["run_dir"] == str(Path(run_dir).resolve()) and source["level"] == info.level
                and manifest["accuracy"] == info.accuracy and manifest["sparsity"] == info.sparsity)
    except (OSError, ValueError, KeyError, TypeError):
        return False
