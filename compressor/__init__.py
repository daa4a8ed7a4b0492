"""Train, iteratively prune (learning-rate rewinding) and export PyTorch models.

Python API::

    from compressor import compress, PruneConfig
    result = compress(model, train_loader, test_loader, PruneConfig(target_sparsity=0.9, epochs=10),
                      out="runs/x")
    result.final()            # {"level", "sparsity", "accuracy", "loss", "epochs", "seconds"}

Reading a run: ``compressor.list_levels(run_dir)`` and ``compressor.load_level(run_dir, method, level)``.

Exporting: ``compressor.export_model(model, out_dir, input_shape=...)`` or ``export_run_dir(run_dir, out_dir)``.

The package is a few rooms, each importing only the ones below it (ARCHITECTURE.md has the table):
the base modules ``errors``, ``config`` and ``checkpoints``; ``prune/`` (masks, criteria, channels,
latency planning); ``train/`` (models, data, training, methods); ``run/`` (the RUN_DIR and its report);
``export/`` (ONNX, MODEL_DIR, int8, compact storage); and the front doors ``pipeline`` (``compress``),
``compress_cli``, ``export_cli``, ``latency_shapes``.

Names are imported lazily (PEP 562): ``edgeprune``'s CLI front imports ``compressor.errors`` and
must not pay for torch when it does.
"""

from typing import Any

_LAZY = {
    "compress": "compressor.pipeline",
    "CompressResult": "compressor.pipeline",
    "PruneConfig": "compressor.config",
    "config_for": "compressor.config",
    "Mask": "compressor.prune.mask",
    "list_levels": "compressor.run.run_dir",
    "load_level": "compressor.run.run_dir",
    "LoadedLevel": "compressor.run.run_dir",
    "export_model": "compressor.export.model_dir",
    "export_run_dir": "compressor.export.from_run",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
