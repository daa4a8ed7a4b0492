"""Errors a user can cause on the workstation side. The CLI turns each into one line and exit code 2."""


class CompressorError(Exception):
    """Base class: bad input or a state of the world the user can fix (message says how)."""


class ConfigError(CompressorError):
    """An argument or hyper-parameter is invalid (unknown model, sparsity outside (0, 1), ...)."""


class RunDirError(CompressorError):
    """RUN_DIR is missing, corrupt, or belongs to a different run."""


class UntrustedFactoryError(RunDirError):
    """A RUN_DIR names a model factory file that the user has not named: it is not run."""


class DivergedError(CompressorError):
    """Training produced a non-finite loss (too high a learning rate, bad data): the level is not saved."""


class CheckpointError(CompressorError):
    """A checkpoint file is missing, truncated or not an edgeprune/PyTorch checkpoint."""


class ExportError(CompressorError):
    """A model or level cannot be exported as asked."""


class StructureError(CompressorError):
    """The model's graph cannot be traced or shrunk for ``--structure channels`` (names the layer/op)."""
