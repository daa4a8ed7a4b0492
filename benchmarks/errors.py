"""Errors a user (or a device) can cause in ``edgeprune bench``; the CLI prints one line, exit code 2."""


class BenchError(Exception):
    """Base class: bad arguments, a missing or corrupt MODEL_DIR, an unreachable device, ..."""


class ModelDirError(BenchError):
    """A MODEL_DIR argument is missing, has no manifest.json, or its manifest is corrupt."""


class TargetError(BenchError):
    """A device cannot be reached or prepared (connection, runtime install, upload)."""


class TargetTimeout(TargetError):
    """A configuration or the device did not finish or answer in time (recorded as "timeout", not "failed")."""


class ResultsError(BenchError):
    """The output directory cannot be written, or an existing results.json is not ours."""
