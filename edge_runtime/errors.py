"""Errors a user (or a broken file) can cause on the device. The CLI prints one line and exits 2."""


class EdgeRuntimeError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ModelDirError(EdgeRuntimeError):
    """MODEL_DIR is missing, corrupt, truncated, fails its sha256 check, or has an unknown format."""


class InputError(EdgeRuntimeError, ValueError):
    """An input feed has the wrong name, shape or dtype."""


class UnsupportedOpError(EdgeRuntimeError):
    """The graph has an operator (or an attribute value) the native executor cannot run."""

    def __init__(self, op_type: str, detail: str = "") -> None:
        self.op_type = op_type
        message = f"operator {op_type!r} is not supported by the edge runtime's native kernels"
        super().__init__(f"{message} ({detail})" if detail else message)
