"""``edgeprune compress --latency-on TARGET``: where the latency tables are measured.

The front (not compressor, which never imports deploy or benchmarks) adds the flag and deploy's
connection flags to compress's parser, builds the latency source (``benchmarks.remote_latency``: this
machine or a device over SSH, behind the user cache of tables) and hands it to ``compress_cli.run`` as
``args.latency_source``.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``--latency-on``, ``--wheelhouse`` and deploy's connection flags."""
    from deploy.cli_options import add_connection_arguments

    group = parser.add_argument_group("where latency is measured (--allocate latency/global-table)")
    group.add_argument("--latency-on", metavar="TARGET",
                       help="measure the latency table on `local` (this machine) or [USER@]HOST[:PORT] through the "
                            "runtime `edgeprune deploy` installs there (installed if needed), for the engine that "
                            "will ship (--quantize) and --latency-threads; cached per device in "
                            "~/.cache/edgeprune/latency (default: this machine, uncached)")
    group.add_argument("--wheelhouse", metavar="DIR",
                       help="wheels for a device without internet (as deploy)")
    add_connection_arguments(parser)


def attach(args: argparse.Namespace) -> None:
    """Set ``args.latency_source`` from ``--latency-on`` (None: compress measures on this machine)."""
    args.latency_source = None
    if args.latency_on is None:
        return
    from benchmarks.remote_latency import RemoteLatencyError, latency_source

    if getattr(args, "latency_table", None) is not None:
        raise RemoteLatencyError("give --latency-on or --latency-table, not both")
    args.latency_source = latency_source(args.latency_on, args)
