"""edge_runtime: run an edgeprune MODEL_DIR on a small device with sparse (CSR) kernels.

Depends on numpy, scipy and onnxruntime only (never torch). The API mirrors onnxruntime's::

    import edge_runtime
    sess = edge_runtime.InferenceSession("MODEL_DIR", kernels="auto", threads=4)
    outputs = sess.run(None, {"input": x})

Names are imported lazily (PEP 562) so that ``edge-runtime --threads N`` can set the BLAS thread
environment before numpy is first imported.
"""

from typing import Any

#: The project's one version string: pyproject.toml, the `edgeprune` front and the device wheel read it.
__version__ = "0.1.0"

_EXPORTS = {
    "InferenceSession": "edge_runtime.session", "NodeArg": "edge_runtime.session",
    "EdgeRuntimeError": "edge_runtime.errors", "ModelDirError": "edge_runtime.errors",
    "InputError": "edge_runtime.errors", "UnsupportedOpError": "edge_runtime.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
