"""`edgeprune deploy [USER@]HOST[:PORT] [HOST ...] MODEL_DIR`: runtime + model on devices over SSH."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, List

from deploy.cli_options import USER_ERRORS, add_connection_arguments, connect_options
from deploy.errors import DeployError, ModelDirError

if TYPE_CHECKING:  # deploy.ssh_config loads paramiko: only when a command runs
    from deploy.ssh_config import HostSpec

__all__ = ["configure", "run", "USER_ERRORS"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add deploy's arguments."""
    parser.usage = "%(prog)s [options] [USER@]HOST[:PORT] [HOST ...] MODEL_DIR"
    parser.add_argument("targets", nargs="+", metavar="TARGET",
                        help="one or more [USER@]HOST[:PORT] (or ~/.ssh/config aliases), then the MODEL_DIR "
                             "written by `edgeprune export`")
    parser.add_argument("--hosts", type=Path, metavar="FILE", help="more hosts, one per line (# comments)")
    parser.add_argument("--name", help="the model's name on the device (default: MODEL_DIR's folder name)")
    parser.add_argument("--wheelhouse", type=Path, metavar="DIR",
                        help="wheels for devices without internet (installed with pip --no-index)")
    parser.add_argument("--keep", type=int, default=3, metavar="N", help="releases to keep per model (default: 3)")
    parser.add_argument("--jobs", type=int, default=4, metavar="N", help="hosts deployed in parallel (default: 4)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="upload progress bars on stderr (default: when stderr is a terminal)")
    add_connection_arguments(parser)


def _hosts(args: argparse.Namespace) -> List["HostSpec"]:
    texts = list(args.targets[:-1])
    if args.hosts is not None:
        try:
            lines = args.hosts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DeployError(f"cannot read --hosts {args.hosts}: {getattr(error, 'strerror', None) or error}") from None
        texts += [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    if not texts:
        raise DeployError("no host given: `edgeprune deploy HOST [HOST ...] MODEL_DIR` (or --hosts FILE)")
    from deploy.ssh_config import HostSpec  # paramiko: loaded for the work, not for --help

    specs = list(dict.fromkeys(HostSpec.parse(text) for text in texts))  # a host twice would race itself
    return specs


def run(args: argparse.Namespace) -> int:
    """Deploy MODEL_DIR to every host; 0 if all succeeded, 1 if any host failed (table at the end).

    Exit 2 stays what it means everywhere: the command line or the inputs were wrong (one line). A
    fleet where some devices were unreachable is a partial failure of the work, reported per host.
    """
    from deploy.model_dir import check_name, load_model_dir
    from deploy.rollout import DeploySettings, deploy_fleet, deploy_to_host, result_table
    from deploy.wheel import build_runtime_wheel

    if args.keep < 1 or args.jobs < 1:
        raise DeployError("--keep and --jobs must be at least 1")
    if args.wheelhouse is not None and not args.wheelhouse.is_dir():
        raise DeployError(f"--wheelhouse {args.wheelhouse} is not a folder")
    specs = _hosts(args)
    model_dir = Path(args.targets[-1])
    model = load_model_dir(model_dir)
    name = check_name(args.name or model_dir.resolve().name)
    settings = DeploySettings(name=name, connect=connect_options(args), python=args.python,
                              remote_root=args.remote_root, wheelhouse=args.wheelhouse, keep=args.keep,
                              progress=sys.stderr.isatty() if args.progress is None else args.progress)
    with tempfile.TemporaryDirectory(prefix="edgeprune-wheel-") as build_dir:
        try:
            wheel = build_runtime_wheel(Path(build_dir))
        except FileNotFoundError as error:
            raise ModelDirError(f"cannot build the runtime wheel: {error}") from None
        if len(specs) == 1:
            deploy_to_host(specs[0], model, wheel, settings, log=print)
            return 0
        results = deploy_fleet(specs, model, wheel, settings, args.jobs, log=print)
    print()
    print(result_table(results))
    failed = [result for result in results if not result.ok]
    if failed:
        print(f"edgeprune deploy: {len(failed)} of {len(results)} hosts failed", file=sys.stderr)
        return 1
    return 0
