"""The ``edgeprune`` command: argument parsing and dispatch, nothing else.

Each subcommand lives in the package that does its work and is imported only when it is chosen, so
``edgeprune deploy`` never pays for (or needs) torch. A subcommand module provides:

- ``configure(parser: argparse.ArgumentParser) -> None``: adds its arguments;
- ``run(args: argparse.Namespace) -> int``: does the work and returns the exit code;
- ``USER_ERRORS``: a tuple of exception types that mean "the user gave us something wrong or the
  world is not as expected". They become one line on stderr and exit code 2; anything else is a bug
  and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NamedTuple, Optional, Sequence

from edgeprune import __version__


class Subcommand(NamedTuple):
    name: str
    module: str
    summary: str


SUBCOMMANDS = [
    Subcommand("demo", "edgeprune.demo", "compress → export → benchmark the embedded default, end to end"),
    Subcommand("compress", "compressor.compress_cli", "train and iteratively prune a model (learning-rate rewinding)"),
    Subcommand("export", "compressor.export_cli", "write a pruned level as sparse ONNX + CSR (MODEL_DIR)"),
    Subcommand("deploy", "deploy.deploy_cli", "install the runtime and a MODEL_DIR on one or more devices over SSH"),
    Subcommand("ls", "deploy.ls_cli", "list the models and releases deployed on a device"),
    Subcommand("rollback", "deploy.rollback_cli", "make an earlier release of a deployed model current"),
    Subcommand("bench", "benchmarks.bench_cli", "measure latency and memory on a device (or locally) beside accuracy"),
]

EPILOG = """\
The flow: compress → export → deploy → bench. Run `edgeprune COMMAND --help` for each command.
On the device itself, use `edge-runtime` (installed by `edgeprune deploy`)."""


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description="Shrink PyTorch models by iterative magnitude pruning with learning-rate rewinding, "
        "and run them fast on a Raspberry Pi.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for sub in SUBCOMMANDS:
        commands.add_parser(sub.name, help=sub.summary, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line, import only the chosen subcommand, run it, map user errors to exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {sub.name: sub for sub in SUBCOMMANDS}
    if not argv:
        # Like `edge-runtime`: no command is a usage error (exit 2), with the overview as the hint.
        _top_parser().print_help(sys.stderr)
        return 2
    if argv[0] not in by_name:
        # An unknown subcommand, `--help` or `--version`: argparse prints and exits with its own code.
        _top_parser().parse_args(argv)
        return 2
    sub = by_name[argv[0]]
    module = importlib.import_module(sub.module)
    parser = argparse.ArgumentParser(prog=f"edgeprune {sub.name}", description=sub.summary)
    module.configure(parser)
    if sub.name == "compress":  # compressor never imports deploy: the front adds where latency is measured
        from edgeprune import latency_on

        latency_on.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        if sub.name == "compress":
            latency_on.attach(args)
        return int(module.run(args) or 0)
    except module.USER_ERRORS as error:
        print(f"edgeprune {sub.name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgeprune {sub.name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgeprune ... | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
