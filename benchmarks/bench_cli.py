"""``edgeprune bench``: measure models on devices (or locally) and write a report beside accuracy.

    edgeprune bench local model_a/ model_b/ --kernels ort,sparse --threads 1,4
    edgeprune bench pi@pi4,pi@pi5:2222 model_a/ digits --out fleet/   # `digits`: deployed by name
    edgeprune bench pi@pi4 --run runs/digits --levels 0,5,10
    edgeprune bench pi@pi4 --latency-table resnet20 --quantize int8 --out pi4-int8.json

Imports only the standard library at module level (the `edgeprune` front end imports every
subcommand's module to build its parser); the harness, paramiko, matplotlib and torch come in run().
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import List, Optional

from benchmarks.errors import BenchError

USER_ERRORS = (BenchError,)

DEFAULT_KERNELS = "ort,dense,sparse,auto,ort-int8"  # ort-int8: only models exported with --quantize int8


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``edgeprune bench``'s arguments."""
    parser.add_argument("target", metavar="TARGET",
                        help="`local`, or [USER@]HOST[:PORT]; several hosts separated by commas run in parallel")
    parser.add_argument("models", metavar="MODEL_DIR", nargs="*",
                        help="MODEL_DIRs written by `edgeprune export` (uploaded to the device's scratch area), "
                        "or names of models already deployed on the device")
    source = parser.add_argument_group("benchmark a compress run")
    source.add_argument("--run", metavar="RUN_DIR", type=Path,
                        help="export and measure the levels of this `edgeprune compress` run (needs torch)")
    source.add_argument("--levels", default="all", help="levels of --run to measure: all or K,K,... (default all)")
    source.add_argument("--model", metavar="FILE.py:FACTORY",
                        help="with --run: build the run's network from this built-in name or factory file (a run "
                        "made with a factory needs it: edgeprune never runs a file a RUN_DIR names)")
    sweep = parser.add_argument_group("the sweep")
    sweep.add_argument("--kernels", default=DEFAULT_KERNELS,
                       help=f"kernel choices, comma-separated (default {DEFAULT_KERNELS})")
    sweep.add_argument("--threads", default="1", help="thread counts, comma-separated (default 1)")
    sweep.add_argument("--warmup", type=int, help="untimed warm-up runs per configuration (edge-runtime's default)")
    sweep.add_argument("--iters", type=int, help="minimum timed runs per configuration (edge-runtime's default)")
    sweep.add_argument("--min-seconds", type=float,
                       help="keep running until this much time has passed, like TFLite's benchmark_model")
    sweep.add_argument("--batch", type=int, help="batch size of the random input (edge-runtime's default: 1)")
    sweep.add_argument("--cooldown", type=float, default=0.0, metavar="S",
                       help="seconds of idle time between configurations (default 0)")
    sweep.add_argument("--config-timeout", type=float, default=300.0, metavar="S",
                       help="kill a configuration that runs longer than this, and go on (default 300)")
    sweep.add_argument("--temp-limit", type=float, default=None, metavar="C",
                       help="warn when the device gets this hot during the sweep (default 80 °C)")
    sweep.add_argument("--jobs", type=int, default=0, help="hosts measured at once (default: all)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, metavar="DIR",
                        help="where results.json, results.csv, report.md and the plots go (default bench-DATE-TIME)")
    output.add_argument("--overwrite", action="store_true", help="replace the results of an earlier sweep in --out")
    output.add_argument("--clean", action="store_true",
                        help="remove what bench uploaded to each device's scratch folder (model copies, device "
                        "scripts), after the sweep; alone (no MODEL_DIRs) it only cleans. Releases stay")
    output.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="a progress bar across the sweep on stderr (default: when stderr is a terminal)")
    from benchmarks.latency_table_cli import configure as configure_latency_table

    configure_latency_table(parser)
    parser.add_argument("--wheelhouse", type=Path, metavar="DIR",
                        help="wheels for devices without internet (installed with pip --no-index)")
    # The flags deploy uses, so a bench reaches a device exactly as deploy did (paramiko comes with it).
    from deploy.cli_options import add_connection_arguments

    add_connection_arguments(parser)
    parser.set_defaults(python=None)  # None: python3 on a device, this interpreter for `local`


def run(args: argparse.Namespace) -> int:
    """Plan the sweep, run it on every target, write results and report; 0 when every figure came."""
    if args.latency_table is not None:
        from benchmarks import latency_table_cli

        return latency_table_cli.run(args)
    from benchmarks.device_facts import DEFAULT_TEMP_LIMIT_C
    from benchmarks.errors import ResultsError
    from benchmarks.harness import SweepSettings, run_sweep, settings_summary
    from benchmarks.results_store import ResultsStore
    from benchmarks.sweep_plan import parse_kernels, parse_threads, plan, unique_labels
    from benchmarks.targets import BenchOptions

    kernels, threads = parse_kernels(args.kernels), parse_threads(args.threads)
    _check_numbers(args)
    local = args.target.strip() == "local"
    hosts = [] if local else [h.strip() for h in args.target.split(",") if h.strip()]
    if not local and not hosts:
        raise BenchError("TARGET: give `local` or [USER@]HOST[:PORT][,HOST...]")
    if args.clean and not args.models and args.run is None:
        return _clean(args, hosts)
    if not args.models and args.run is None:
        raise BenchError("nothing to measure: give MODEL_DIRs and/or --run RUN_DIR")
    if args.model is not None and args.run is None:
        raise BenchError("--model builds the network of a --run RUN_DIR; give --run too")
    out_dir = args.out or Path(datetime.now().strftime("bench-%Y%m%d-%H%M%S"))
    _check_out_dir(out_dir, args.overwrite)
    models = _model_entries(args.models, local)  # every local MODEL_DIR checked before anything is written
    targets = _targets(args, hosts)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ResultsError(f"--out {out_dir}: cannot create it ({error.strerror or error})") from None
    if args.run is not None:
        from benchmarks.run_levels import export_levels
        from benchmarks.sweep_plan import read_model_dir

        exported = export_levels(args.run, args.levels, out_dir, model=args.model)
        models = [read_model_dir(path, label=path.name) for path in exported] + models
    for entry, label in zip(models, unique_labels(models)):
        entry.label = label

    options = BenchOptions(warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds,
                           batch=args.batch, timeout_s=args.config_timeout)
    settings = SweepSettings(cooldown_s=args.cooldown, jobs=args.jobs)
    temp_limit = args.temp_limit if args.temp_limit is not None else DEFAULT_TEMP_LIMIT_C
    configs = plan(models, kernels, threads)
    store = ResultsStore(out_dir, settings_summary(options, settings, kernels, threads, temp_limit),
                         [m.describe() for m in models], {t.spec: t.spec for t in targets})
    interrupted = False
    with _progress_bar(len(configs) * len(targets), args.progress) as advance:
        try:
            run_sweep(targets, models, configs, options, settings, store, advance)
        except KeyboardInterrupt:
            interrupted = True
    code = _finish(store, out_dir, interrupted)
    return max(code, _clean(args, hosts)) if args.clean else code


def _clean(args: argparse.Namespace, hosts: List[str]) -> int:
    """``--clean``: empty each device's scratch folder; one line per host; 1 if any could not be cleaned."""
    from benchmarks.targets import clean_scratch
    from deploy.cli_options import connect_options
    from deploy.errors import DeployError

    if not hosts:
        print("edgeprune bench: --clean: the local target uploads nothing; nothing to clean", file=sys.stderr)
        return 0
    try:
        options = connect_options(args)
    except DeployError as error:
        raise BenchError(str(error)) from None
    failed = 0
    for host in dict.fromkeys(hosts):
        try:
            print(f"edgeprune bench: {clean_scratch(host, options, args.remote_root)}", file=sys.stderr)
        except BenchError as error:
            print(f"edgeprune bench: error: --clean: {error}", file=sys.stderr)
            failed = 1
    if failed and not args.models and args.run is None:
        raise BenchError("--clean: some devices could not be cleaned (see above)")
    return failed


def _check_numbers(args: argparse.Namespace) -> None:
    for name, least in (("warmup", 0), ("iters", 1), ("batch", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise BenchError(f"--{name}: must be >= {least}, got {value}")
    for name in ("min_seconds", "cooldown"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise BenchError(f"--{name.replace('_', '-')}: must be >= 0, got {value}")
    if args.config_timeout <= 0:
        raise BenchError(f"--config-timeout: must be > 0, got {args.config_timeout}")
    if args.jobs < 0:
        raise BenchError(f"--jobs: must be >= 0, got {args.jobs}")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BenchError(f"--out {out_dir}: exists and is not a directory")
    if (out_dir / "results.json").exists() and not overwrite:
        raise BenchError(f"--out {out_dir}: holds the results of an earlier sweep; pass --overwrite or choose another")


def _model_entries(arguments: List[str], local: bool) -> list:
    """ModelEntries for the MODEL_DIR arguments: a local folder, else a deployed model's name."""
    from benchmarks.errors import ModelDirError
    from benchmarks.sweep_plan import ModelEntry, read_model_dir
    from benchmarks.targets import DEPLOYED_NAME

    entries = []
    for text in arguments:
        path = Path(text)
        if path.exists() or local or not DEPLOYED_NAME.match(text):
            entries.append(read_model_dir(path))
        else:
            entries.append(ModelEntry(label=text, deployed_name=text))
    if any(e.local_dir is None for e in entries) and local:
        raise ModelDirError("the local target takes MODEL_DIR paths only")
    return entries


def _targets(args: argparse.Namespace, hosts: List[str]) -> list:
    from benchmarks.targets import target_for

    if not hosts:
        return [target_for("local", python=args.python)]
    from deploy.cli_options import connect_options
    from deploy.errors import DeployError

    try:
        options = connect_options(args)
    except DeployError as error:
        raise BenchError(str(error)) from None
    return [target_for(host, options, remote_root=args.remote_root, python=args.python, wheelhouse=args.wheelhouse)
            for host in dict.fromkeys(hosts)]


class _progress_bar:
    """A tqdm bar across the whole sweep (all hosts), safe to advance from the hosts' threads; into a
    pipe or a log (stderr not a terminal, no --progress/--no-progress), a plain line per configuration
    instead, so a sweep of minutes is never silent."""

    def __init__(self, total: int, show: Optional[bool]) -> None:
        import threading

        from tqdm import tqdm

        self._lines = show is None and not sys.stderr.isatty()
        self._bar = tqdm(total=total, unit="config", desc="bench", file=sys.stderr,
                         disable=self._lines or (None if show is None else not show))
        self._lock = threading.Lock()
        self._total, self._done, self._began = total, 0, time.monotonic()

    def __enter__(self):
        def advance(n: int) -> None:
            if n:
                with self._lock:
                    self._bar.update(n)
                    self._done += n
                    if self._lines:
                        print(f"bench: {self._done}/{self._total} configurations measured "
                              f"({time.monotonic() - self._began:.0f} s)", file=sys.stderr, flush=True)
        return advance

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def _finish(store, out_dir: Path, interrupted: bool) -> int:
    """Save the final results.json, write report, CSV and plots, print the table and warnings."""
    from benchmarks.plots import write_plots
    from benchmarks.report import warnings, write_reports

    data = store.data
    found = warnings(data)
    store.finish(interrupted=interrupted, warnings=found)
    table, markdown = write_reports(data, out_dir)
    write_plots(table, out_dir)
    print(markdown)
    for warning in found:
        print(f"edgeprune bench: WARNING: {warning}", file=sys.stderr)
    print(f"edgeprune bench: results in {out_dir}/ (results.json, results.csv, report.md, plots)", file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
    host_errors = [_with_host(entry.get("name") or key, entry["error"]) for key, entry in data["hosts"].items()
                   if entry.get("error")]
    if host_errors and not any(r["status"] == "ok" for r in data["results"]):
        raise BenchError("; ".join(host_errors))
    failed = sum(r["status"] != "ok" for r in data["results"])
    return 1 if failed or host_errors else 0


def _with_host(host: str, message: str) -> str:
    return message if message.startswith(host) else f"{host}: {message}"
