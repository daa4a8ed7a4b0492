"""Errors a user (or a device) can cause in ``edgeprune bench``; the CLI prints one line, exit code 2."""


class BenchError(Exception):
    """Base class: bad arguments, a missing or corrupt MODEL_DIR, an unreachable device, ..."""


class ModelDirError(BenchError):
    """A MODEL_DIR argument is missing, has no manifest.json, or its manifest is corrupt."""


class TargetError(BenchError):
    """A device cannot be reached or prepared (connection, runtime install, upload)."""


class ResultsError(BenchError):
    """The output directory cannot be written, or an existing results.json is not ours."""
