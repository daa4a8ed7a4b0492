"""`edgeprune rollback HOST NAME [--to RELEASE]`: make an earlier release current again, safely.

The target release is re-verified (sha256s) and smoke-tested on the device before ``current`` moves,
so a rollback cannot switch to a damaged release. It holds the remote root's lock
(:mod:`deploy.root_lock`), like deploy, so the two cannot race.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import argparse
import sys

from deploy.cli_options import USER_ERRORS, add_connection_arguments, connect_options
from deploy.errors import ReleaseError

if TYPE_CHECKING:  # deploy.device loads paramiko: only when a command runs
    from deploy.device import Device

__all__ = ["configure", "run", "USER_ERRORS"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add rollback's arguments."""
    parser.add_argument("host", metavar="[USER@]HOST[:PORT]")
    parser.add_argument("name", metavar="NAME", help="the deployed model's name (see `edgeprune ls HOST`)")
    parser.add_argument("--to", metavar="RELEASE",
                        help="release id (or a unique prefix); default: the one deployed before the current one")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Verify, smoke-test and switch to the chosen release, holding the remote root's lock."""
    from deploy.root_lock import hold_root_lock

    from deploy.device import Device
    from deploy.ssh_config import HostSpec  # paramiko: loaded for the work, not for --help

    with Device.connect(HostSpec.parse(args.host), connect_options(args)) as device:
        root = device.resolve_path(args.remote_root)
        if not device.is_dir(root):
            raise ReleaseError(f"{device.label}: no model named {args.name!r} is deployed under {root}")
        with hold_root_lock(device, root, warn=lambda line: print(line, file=sys.stderr)):
            return _roll_back(device, root, args)


def _roll_back(device: "Device", root: str, args: argparse.Namespace) -> int:
    """run()'s steps, while this rollback holds the root's lock (no deploy can race it)."""
    from deploy.preflight import venv_python
    from deploy.release import RemoteModel

    model = RemoteModel(device, root, args.name)
    releases = model.releases()
    if not releases:
        raise ReleaseError(f"{device.label}: no model named {args.name!r} is deployed under {root}")
    current = model.current_id()
    if args.to:
        target = model.resolve(args.to)
    else:
        # Releases are newest-deployed first; the one before the current is the next older one.
        ids = [release.id for release in releases]
        older = ids[ids.index(current) + 1:] if current in ids else ids
        if not older:
            raise ReleaseError(f"{device.label}: {args.name} has no release older than {current} to roll back to")
        target = older[0]
    if target == current:
        print(f"{device.label}: {args.name} is already at release {target}")
        return 0
    try:
        model.verify_release(target)
    except ReleaseError as error:
        raise ReleaseError(f"{error}; release {target} is damaged: deploy its MODEL_DIR again to repair it") from None
    smoke = model.smoke_test(model.release_dir(target), venv_python(root))
    print(f"{device.label}: smoke test: {smoke}")
    model.switch(target)
    print(f"{device.label}: {args.name} is now at release {target} (was {current})")
    return 0
