"""Train, iteratively prune (learning-rate rewinding) and export PyTorch models.

Python API::

    from compressor import compress, PruneConfig
    result = compress(model, train_loader, test_loader, PruneConfig(target_sparsity=0.9, epochs=10),
                      out="runs/x")
    result.final()            # {"level", "sparsity", "accuracy", "loss", "epochs", "seconds"}

Reading a run: ``compressor.run_dir.list_levels(run_dir)`` and ``load_level(run_dir, method, level)``.

Names are imported lazily (PEP 562): ``edgeprune``'s CLI front imports ``compressor.errors`` and
must not pay for torch when it does.
"""

from typing import Any

_LAZY = {
    "compress": "compressor.pipeline",
    "CompressResult": "compressor.pipeline",
    "PruneConfig": "compressor.config",
    "config_for": "compressor.config",
    "Mask": "compressor.mask",
    "list_levels": "compressor.run_dir",
    "load_level": "compressor.run_dir",
    "LoadedLevel": "compressor.run_dir",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
