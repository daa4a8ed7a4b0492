"""`edgeprune ls HOST`: the runtime, models and releases on a device, which is current, their sizes."""

from __future__ import annotations

import argparse
import time

from deploy.cli_options import USER_ERRORS, add_connection_arguments, connect_options

__all__ = ["configure", "run", "USER_ERRORS"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ls's arguments."""
    parser.add_argument("host", metavar="[USER@]HOST[:PORT]")
    add_connection_arguments(parser)


def _size(count: int) -> str:
    return f"{count / 2**20:.2f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def run(args: argparse.Namespace) -> int:
    """Print the device's runtime line and a table of models and releases (``*`` = current)."""
    from deploy.release import RemoteModel, list_models
    from deploy.runtime_install import installed_runtime

    from deploy.device import Device
    from deploy.ssh_config import HostSpec  # paramiko: loaded for the work, not for --help

    with Device.connect(HostSpec.parse(args.host), connect_options(args)) as device:
        root = device.resolve_path(args.remote_root)
        runtime = installed_runtime(device, root)
        print(f"{device.label}: {root}")
        print(f"runtime: {runtime.get('reported') or runtime.get('version')} ({runtime.get('version')}, "
              f"python {runtime.get('python')})" if runtime else "runtime: not installed")
        rows = [("MODEL", "RELEASE", "CURRENT", "LEVEL", "SPARSITY", "ACCURACY", "SIZE", "DEPLOYED")]
        for name in list_models(device, root):
            model = RemoteModel(device, root, name)
            for release in model.releases():
                about = model.summary(release.id)
                rows.append((name, release.id, "*" if release.current else "", about["level"], about["sparsity"],
                             about["accuracy"], _size(release.size),
                             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(release.deployed))))
    if len(rows) == 1:
        print("no models deployed")
        return 0
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
