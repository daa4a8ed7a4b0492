"""One deploy or rollback at a time per remote root, with a lock that cannot go stale.

The lock is util-linux ``flock`` on the remote root folder itself, held by a process on the device
whose stdin is our SSH channel::

    flock --nonblock --conflict-exit-code 75 ROOT sh -c 'echo locked; exec cat'

``cat`` waits for EOF on that channel. When we are done we close it; when the connection dies (crash,
Ctrl-C, cable pulled) sshd closes it. Either way ``cat`` and ``flock`` exit and the kernel releases the
lock: there is no lock file to clean up by hand, and none to delete by mistake (a lock on the folder
adds nothing to the root's layout). A device without ``flock`` is deployed to unlocked, with a
warning, as before this lock existed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from deploy.connection import Device, RemoteProcess
from deploy.errors import DeployError, LockBusy

FLOCK = "flock"  # util-linux; on Debian and Raspberry Pi OS by default

# flock's exit status when the lock is taken (EX_TEMPFAIL), so it differs from flock's own errors (1, 66...).
_BUSY = 75
# `timeout` (see Device.start) exits 127 when it cannot find the command.
_NOT_FOUND = 127
# The holder only waits; a limit it never reaches in practice, but one the device still enforces.
_HOLD_LIMIT = 7 * 24 * 3600.0
_READY = "locked\n"


def lock_path(root: str) -> str:
    """What is locked for an (absolute) remote root: the folder itself (flock(2) works on folders)."""
    return root


@contextmanager
def hold_root_lock(device: Device, root: str, warn: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock on the remote root folder for the ``with`` block; ROOT must exist.

    Raises LockBusy (one line, nothing touched) if another deploy or rollback holds it. Without
    ``flock`` on the device, calls ``warn`` with one line and runs the block unlocked.
    """
    path = lock_path(root)
    holder = device.start([FLOCK, "--nonblock", "--conflict-exit-code", str(_BUSY), path,
                           "sh", "-c", "echo locked; exec cat"], timeout=_HOLD_LIMIT, keep_stdin_open=True)
    if not holder.read_until(_READY, timeout=device.options.timeout + 15):
        _refuse(device, holder, path)
        warn(f"{device.label}: warning: `flock` (util-linux) is not installed; going on without the deploy "
             f"lock on {path}, so do not deploy or roll back this device from two places at once")
        yield
        return
    try:
        yield
    finally:
        _release(holder)


def _refuse(device: Device, holder: RemoteProcess, path: str) -> None:
    """Raise why the holder did not take the lock; return only if ``flock`` is missing."""
    if not holder.exited():
        holder.cancel()
        raise DeployError(f"{device.label}: `flock {path}` did not answer; is the device overloaded?")
    result = holder.wait()
    if result.exit_status == _BUSY:
        raise LockBusy(f"another edgeprune deploy or rollback is running on {device.label} (it holds the lock "
                       f"on {path}); try again when it finishes")
    if result.exit_status == _NOT_FOUND:
        return
    last = (result.stderr.strip().splitlines() or [f"exit {result.exit_status}"])[-1]
    raise DeployError(f"{device.label}: cannot lock {path}: {last}")


def _release(holder: RemoteProcess) -> None:
    """EOF to the holder's ``cat``: it exits, and with it ``flock`` and the lock; kill it if it lingers."""
    holder.close_stdin()
    try:
        deadline = time.monotonic() + 5
        while not holder.exited() and time.monotonic() < deadline:
            _ = holder.device.transport  # ConnectionLost once the connection is gone: no point waiting
            time.sleep(0.02)
        if holder.exited():
            holder.wait()
        else:
            holder.cancel()
    except DeployError:
        pass  # the connection is gone: sshd closed the holder's stdin, which releases the lock all the same
