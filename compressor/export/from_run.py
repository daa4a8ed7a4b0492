"""Export a level of a RUN_DIR (or a model plus a checkpoint file) as a MODEL_DIR.

This is the reading side of export: which level to take (:func:`pick_level`), the example inputs the
run's data gives, and the ``source`` record; writing the folder is :mod:`compressor.export.model_dir`'s
job. Reading a run never runs a file the run names (``run_dir.load_level``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from compressor.errors import ExportError
from compressor.export.model_dir import ExportResult, export_model


def pick_level(levels: Sequence[Any], method: Optional[str], level: Optional[int],
               max_drop: Optional[float]) -> Any:
    """The level to export: explicit, or the sparsest within ``max_drop`` accuracy points of dense,
    or (neither given) the last finished level. ``levels`` are run_dir.LevelInfo records."""
    if not levels:
        raise ExportError("the run has no finished level yet")
    method = method or levels[0].method
    of_method = [info for info in levels if info.method == method]
    if not of_method:
        have = ", ".join(sorted({info.method for info in levels}))
        raise ExportError(f"the run has no method {method!r}; it has {have}")
    if level is not None:
        chosen = next((info for info in of_method if info.level == level), None)
        if chosen is None:
            have = ", ".join(str(info.level) for info in of_method)
            raise ExportError(f"no finished level {level} for {method}; finished: {have}")
        return chosen
    if max_drop is None:
        return of_method[-1]
    if not max_drop >= 0:  # also refuses NaN; a negative drop would leave no level to choose
        raise ExportError(f"--max-drop must be >= 0 accuracy points, got {max_drop}")
    dense = next((info for info in of_method if info.level == 0), None)
    if dense is None:
        raise ExportError("--max-drop needs the dense level (0), which is not finished")
    if dense.accuracy != dense.accuracy:  # NaN: a run trained with a regression loss has no accuracy
        raise ExportError("--max-drop needs accuracies, and this run's loss reports none; pick --level")
    floor = dense.accuracy - max_drop / 100.0  # accuracies are fractions, POINTS are percent
    within = [info for info in of_method if info.accuracy >= floor]
    return max(within, key=lambda info: (info.sparsity, info.level))


def _real_sample(data_spec: Optional[str], input_shape: Optional[Sequence[int]], count: int = 1,
                 trusted: bool = False) -> Any:
    """A few real test examples of the run's data (an array, tuple or dict of arrays, batch first), or
    None when the data cannot be loaded here."""
    # A data factory (file.py:factory) is code: run only when the user named it (``trusted``), never
    # because a RUN_DIR's config.json names it.
    builtin = data_spec == "digits" or (data_spec or "").startswith("cifar10:")
    if not data_spec or not (builtin or trusted):
        return None
    try:
        from compressor.train.batches import example_inputs, split_batch
        from compressor.train.data import load_data

        _, test_loader = load_data(data_spec, input_shape, count, 0)
        inputs, _ = split_batch(next(iter(test_loader)))
        examples = example_inputs(inputs, count)
    except Exception:  # any failure only means we fall back to seeded noise for the smoke test
        return None
    if isinstance(examples, dict):
        return {name: value.numpy() for name, value in examples.items()}
    if isinstance(examples, tuple):
        return tuple(value.numpy() for value in examples)
    return examples.numpy()


def export_run_dir(run_dir: Path | str, out_dir: Path | str, *, method: Optional[str] = None,
                   level: Optional[int] = None, max_drop: Optional[float] = None,
                   values_dtype: str = "float32", output: Optional[str] = None, sample: Any = None,
                   force: bool = False, model: Optional[str] = None, data: Optional[str] = None,
                   layout: str = "compact", input_shape: Optional[Sequence[int]] = None) -> ExportResult:
    """Export one level of a RUN_DIR (see :func:`pick_level`) to ``out_dir``.

    ``model`` (a built-in name or ``file.py:factory``) builds the network; a run made with a factory
    needs it, since reading a run never runs a file the run names (``run_dir.load_level``). The
    example inputs come from ``sample``, else the data factory the user names in ``data``, else the
    run's built-in test data, else seeded noise of the run's input shape; ``output`` defaults to the
    run's own ``--output``. ``input_shape`` exports at another input size than the run's (a CNN trained
    at 32×32 run at 128×128 on the device): the example is then seeded noise of that shape.
    """
    from compressor.errors import CompressorError
    from compressor.run.run_dir import CONFIG, list_levels, load_level, read_json

    try:
        chosen = pick_level(list_levels(Path(run_dir)), method, level, max_drop)
        loaded = load_level(Path(run_dir), chosen.method, chosen.level, model=model)
        config = read_json(Path(run_dir) / CONFIG)
    except ExportError:
        raise
    except CompressorError as error:
        raise ExportError(str(error)) from error
    shape = tuple(input_shape) if input_shape else loaded.input_shape
    example = sample
    if example is None and not (input_shape and tuple(input_shape) != tuple(loaded.input_shape or ())):
        example = _real_sample(data or config.get("data"), shape, trusted=data is not None)
    factory = _data_factory(config.get("data")) if example is None and data is None else None
    hint = f"--data {factory} (the run's data factory; name only one you trust) or " if factory else ""
    if not shape and example is None:
        raise ExportError(f"{run_dir}: the run records no input shape and its data cannot be loaded here; "
                          f"give example inputs: {hint}--sample inputs.npz")
    source = {"run_dir": str(Path(run_dir).resolve()), "model": loaded.model_name, "method": loaded.method,
              "level": loaded.level, "data": config.get("data"), **structure_family(run_dir, config),
              **structure_figures(run_dir, config, loaded.method, loaded.level)}
    try:
        result = export_model(loaded.model, out_dir, input_shape=shape, values_dtype=values_dtype, sample=example,
                              output=output or config.get("output"), accuracy=loaded.accuracy,
                              sparsity=loaded.sparsity, source=source, force=force, layout=layout)
    except ExportError as error:
        if example is None and hint and "cannot run on the example inputs" in str(error):
            # seeded float noise fed a model that wants other inputs (token ids): the fix is real data
            raise ExportError(f"{error}; the example was float noise of shape {list(shape)}: give real inputs "
                              f"with {hint}--sample inputs.npz") from error
        raise
    return replace(result, picked=_why_picked(chosen, level, max_drop, source))


def _data_factory(spec: Optional[str]) -> Optional[str]:
    """The run's data spec when it is a factory file (``file.py:factory``), which export never runs unasked."""
    return spec if spec and ".py:" in spec else None


def _why_picked(chosen: Any, level: Optional[int], max_drop: Optional[float],
                source: Optional[Dict[str, Any]] = None) -> str:
    """One line saying which level was exported and by which rule, so a default is never a surprise. A
    --structure channels level says the params and MACs removed (``source``'s figures): a smaller dense
    network has no zeros, so "sparsity" would mislead."""
    from edge_runtime.model_format import structured_summary

    if level is not None:
        why = "as asked (--level)"
    elif max_drop is not None:
        why = f"the sparsest level within {max_drop:g} point{'' if max_drop == 1 else 's'} of dense (--max-drop)"
    else:
        why = "the method's last level, the default (--level K or --max-drop POINTS pick another)"
    accuracy = "no accuracy" if chosen.accuracy != chosen.accuracy else f"accuracy {chosen.accuracy:.2%}"
    amount = structured_summary(source, chosen.sparsity) or f"sparsity {chosen.sparsity:.1%}"
    return f"exported {chosen.method} level {chosen.level} ({amount}, {accuracy}): {why}"


def structure_family(run_dir: Path | str, config: Dict[str, Any]) -> Dict[str, str]:
    """``{"family": ...}`` for a --structure channels run: its levels have different layer shapes but
    one dense reference, which is what bench's speed-ups must compare against; ``{}`` otherwise."""
    if config.get("structure") in (None, "weights"):
        return {}
    return {"family": f"channels:{Path(run_dir).resolve()}"}


def structure_figures(run_dir: Path | str, config: Dict[str, Any], method: str, level: int) -> Dict[str, Any]:
    """For a --structure channels level: ``structure``, its ``params`` and ``macs`` and the dense level's
    (``dense_params``, ``dense_macs``), so ``info`` and export report what was removed — a smaller dense
    network has no zeros to count. ``{}`` for an unstructured run or a metrics file without them."""
    from compressor.run.run_dir import METRICS, RunDirError, read_json

    if config.get("structure") != "channels":
        return {}
    try:
        levels = {int(e["level"]): e for e in read_json(Path(run_dir) / METRICS)["methods"][method]}
        figures = {"structure": "channels", "params": int(levels[level]["params"]),
                   "macs": int(levels[level]["macs"]), "dense_params": int(levels[0]["params"]),
                   "dense_macs": int(levels[0]["macs"])}
    except (KeyError, TypeError, ValueError, AttributeError, RunDirError):  # an older run: the family alone says it
        return {"structure": "channels"}
    return figures


def export_checkpoint(model_spec: str, checkpoint: Optional[Path | str], out_dir: Path | str, *,
                      input_shape: Optional[Sequence[int]] = None, values_dtype: str = "float32",
                      output: Optional[str] = None, sample: Any = None, force: bool = False,
                      layout: str = "compact") -> ExportResult:
    """Export any registry/user model (``--model``) with weights from a checkpoint or state_dict file."""
    from compressor import checkpoints
    from compressor.train.models import build_model, input_shape_of

    model = build_model(model_spec)
    if checkpoint is not None:
        checkpoints.load_into(model, checkpoints.load_state_dict(Path(checkpoint)), str(checkpoint))
    shape = tuple(input_shape) if input_shape else input_shape_of(model)
    source = {"model": model_spec, "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None}
    return export_model(model, out_dir, input_shape=shape, values_dtype=values_dtype, sample=sample,
                        output=output, source=source, force=force, layout=layout)


def read_sample(path: Path | str) -> Any:
    """Example inputs from an ``.npz`` (no pickle): each member a keyword input of the model's forward
    (``input_ids``, ``attention_mask``), batch first; a single member named ``input`` is positional."""
    import zipfile

    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ExportError(f"{path}: not a readable .npz of example inputs ({error})") from error
    if not arrays:
        raise ExportError(f"{path} holds no arrays")
    return arrays["input"] if list(arrays) == ["input"] else arrays
