"""Errors a user (or the network, or the device) can cause while deploying.

Every message is one line that says what happened on which host and, where there is one, the fix.
The CLI turns each into ``edgeprune COMMAND: error: MESSAGE`` and exit code 2.
"""


class DeployError(Exception):
    """Base class of everything `edgeprune deploy/ls/rollback` reports as a user error."""


class ConnectError(DeployError):
    """The SSH connection could not be made (refused, unresolvable, timed out, protocol failure)."""


class HostKeyError(ConnectError):
    """The host key is unknown (and not to be trusted) or differs from the recorded one."""


class AuthError(ConnectError):
    """The server refused every key we offered."""


class ConnectionLost(DeployError):
    """An established connection dropped in the middle of an operation."""


class RemoteCommandError(DeployError):
    """A command on the device exited non-zero (the message carries its last stderr line)."""

    def __init__(self, message: str, exit_status: int = 1, stderr: str = ""):
        super().__init__(message)
        self.exit_status = exit_status
        self.stderr = stderr


class RemoteTimeout(DeployError):
    """A command on the device ran past its time limit and was killed."""


class UploadError(DeployError):
    """A file could not be written on the device (disk full, permission, ...)."""


class PreflightError(DeployError):
    """The device lacks something deploy needs (Python >= 3.9, venv, disk space, ...)."""


class ModelDirError(DeployError):
    """The local MODEL_DIR is missing, incomplete or its manifest is corrupt."""


class ReleaseError(DeployError):
    """A release operation failed on the device (checksum mismatch, smoke test, unknown release)."""


class LockBusy(DeployError):
    """Another deploy or rollback holds the remote root's lock; nothing was touched."""
