"""One deploy or rollback at a time per remote root, with a lock that cannot go stale.

The lock is util-linux ``flock`` on the remote root folder itself, held by a process on the device
whose stdin is our SSH channel::

    flock --nonblock --conflict-exit-code 75 ROOT sh -c HOLDER sh TAG

The holder script waits for EOF on that channel. When we are done we close it; when the connection
dies (crash, Ctrl-C, kill -9, cable pulled) sshd closes it. Either way the holder then ends every
command this connection started (each carries ``EDGEPRUNE_SESSION=TAG`` in its environment, see
:mod:`deploy.remote_command`; their children inherit it), waits until they are gone, and only then
exits, so that ``flock`` exits and the kernel releases the lock. A command started under the lock
never outlives it: a second deploy cannot race a killed client's pip. There is no lock file to clean
up by hand, and none to delete by mistake (a lock on the folder adds nothing to the root's layout).
A device without ``flock`` is deployed to unlocked, with a warning, as before this lock existed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from deploy.device import Device
from deploy.remote_command import RemoteProcess
from deploy.errors import DeployError, LockBusy, RemoteTimeout

FLOCK = "flock"  # util-linux; on Debian and Raspberry Pi OS by default

# flock's exit status when the lock is taken (EX_TEMPFAIL), so it differs from flock's own errors (1, 66...).
_BUSY = 75
# `timeout` (see Device.start) exits 127 when it cannot find the command.
_NOT_FOUND = 127
# The holder only waits; a limit it never reaches in practice, but one the device still enforces.
_HOLD_LIMIT = 7 * 24 * 3600.0
_READY = "locked\n"

# Runs under flock with the connection's tag as $1. A command of ours shows the tag in its command
# line while its login shell starts it (`export EDGEPRUNE_SESSION=TAG; exec ...`), then, from the exec
# on, in its environment (/proc/PID/environ), as do its children: grep both at once (the pattern
# comes on stdin, so grep's own command line does not match). Only our own user's processes are
# readable. TERM what is found, every 0.1 s (a command whose shell was just forking appears on the
# next look), until nothing is left (looking at least 3 times) or 5 s have passed; then KILL the
# rest and exit, and the lock goes with flock.
HOLDER = r"""
echo locked
cat >/dev/null
tagged() {
  printf 'EDGEPRUNE_SESSION=%s\n' "$1" | grep -lsaF -f - /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null |
    sed 's|^/proc/||; s|/[a-z]*$||' | sort -u
}
n=0
while [ $n -lt 50 ]; do
  pids=$(tagged "$1")
  if [ -n "$pids" ]; then kill -TERM $pids 2>/dev/null; elif [ $n -ge 2 ]; then break; fi
  sleep 0.1
  n=$((n + 1))
done
pids=$(tagged "$1")
[ -z "$pids" ] || kill -KILL $pids 2>/dev/null
exit 0
"""


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
                           "sh", "-c", HOLDER, "sh", device.session_tag], timeout=_HOLD_LIMIT,
                          keep_stdin_open=True, tagged=False)
    if not holder.read_until(_READY, timeout=device.options.timeout):
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
        # It had the whole --timeout to say "locked": the device is hung or far too busy to deploy to.
        why = (f"{device.label}: `flock {path}` did not answer within {device.options.timeout:g} s; gave up "
               "(is the device hung or overloaded? see --timeout)")
        device.abort(why)
        raise RemoteTimeout(why)
    result = holder.wait()
    if result.exit_status == _BUSY:
        raise LockBusy(f"another edgeprune deploy or rollback is running on {device.label} (it holds the lock "
                       f"on {path}); try again when it finishes")
    if result.exit_status == _NOT_FOUND:
        return
    last = (result.stderr.strip().splitlines() or [f"exit {result.exit_status}"])[-1]
    raise DeployError(f"{device.label}: cannot lock {path}: {last}")


def _release(holder: RemoteProcess) -> None:
    """EOF to the holder: it ends what we started, exits, and with it ``flock`` and the lock.

    Bounded (the holder may spend up to 5 s ending commands); after Ctrl-C or on a hung device the
    connection is already cut, and the device releases the lock by itself.
    """
    holder.close_stdin()
    try:
        deadline = time.monotonic() + holder.device.options.timeout + 10
        while not holder.exited() and time.monotonic() < deadline:
            _ = holder.device.transport  # ConnectionLost once the connection is gone: no point waiting
            time.sleep(0.02)
        if holder.exited():
            holder.wait()
        else:
            holder.cancel()
    except DeployError:
        pass  # the connection is gone: sshd closed the holder's stdin, which releases the lock all the same
