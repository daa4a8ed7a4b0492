"""Run a sweep: every configuration on every target, hosts in parallel, results saved as they arrive.

Per host, configurations run one after another (two benchmarks at once on one Pi would measure each
other); hosts run side by side in threads, at most ``jobs`` at a time. A configuration that crashes or
times out becomes a failed record and the sweep goes on; a host that cannot be reached is reported
and the other hosts go on. Ctrl-C stops every host (killing what runs on the devices), saves what
was measured, and re-raises.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

from benchmarks.device_output import read_bench_report
from benchmarks.errors import BenchError, TargetTimeout
from benchmarks.results_store import ResultsStore, now
from benchmarks.sweep_plan import Config, ModelEntry
from benchmarks.targets import BenchOptions, Target


@dataclass(frozen=True)
class SweepSettings:
    """How to sweep, beside the per-configuration BenchOptions."""

    cooldown_s: float = 0.0   # idle time between configurations, so heat from one doesn't slow the next
    jobs: int = 0             # hosts at once; 0 = all


def summarise_failure(envelope: Dict[str, object], timeout_s: float) -> str:
    """One line saying why a configuration produced no figures."""
    if envelope.get("timed_out"):
        return f"timed out after {timeout_s:g} s and was killed"
    lines = [line.strip() for line in str(envelope.get("stderr") or "").splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"exit {envelope.get('returncode')}: {last}"


def make_record(host: str, models: Sequence[ModelEntry], config: Config,
                envelope: Dict[str, object], timeout_s: float) -> Dict[str, object]:
    """One results.json record: which configuration, its status, and every raw figure."""
    record: Dict[str, object] = {
        "host": host, "model": models[config.model].label, "model_index": config.model,
        "kernels": config.kernels, "threads": config.threads, "reference_only": config.reference_only,
        "status": "ok", "error": None, "wall_s": envelope.get("wall_s"),
        "temperature_c_before": envelope.get("temperature_c_before"),
        "temperature_c_after": envelope.get("temperature_c_after"),
        "throttled_after": envelope.get("throttled_after"),
        "bench": None, "finished_at": now(),
    }
    if envelope.get("timed_out"):
        record.update(status="timeout", error=summarise_failure(envelope, timeout_s))
    elif envelope.get("returncode") != 0:
        record.update(status="failed", error=summarise_failure(envelope, timeout_s))
    elif envelope.get("stdout_cut"):  # its stderr's last line says how much it printed
        record.update(status="failed", error=summarise_failure(envelope, timeout_s).partition(": ")[2])
    else:
        # Checked here, where results come in: a figure the report cannot format is a failed row.
        bench, why = read_bench_report(str(envelope.get("stdout") or ""))
        if bench is None:
            record.update(status="failed", error=why)
        else:
            record["bench"] = bench
    return record


def failed_record(host: str, models: Sequence[ModelEntry], config: Config, message: str) -> Dict[str, object]:
    """The record of a configuration that could not run at all (model upload or connection failed)."""
    record = make_record(host, models, config, {"returncode": None}, 0)
    record.update(status="failed", error=message)
    return record


class HostRun:
    """One host's part of the sweep, run in its own thread."""

    def __init__(self, target, models: Sequence[ModelEntry], configs: Sequence[Config],
                 options: BenchOptions, settings: SweepSettings, store: ResultsStore,
                 advance: Callable[[int], None], stop: threading.Event, lock: threading.Lock) -> None:
        self.target, self.models, self.configs = target, models, configs
        self.options, self.settings, self.store = options, settings, store
        self.advance, self.stop, self.models_lock = advance, stop, lock
        self.key = target.spec  # the store's key for this host, fixed before connecting

    def run(self) -> None:
        """Open the target, measure every configuration, record the facts before and after."""
        done = 0
        try:
            self.target.open()
            self.store.set_host(self.key, name=self.target.name, facts_before=self.target.facts())
            paths = self._stage_models()
            for n, config in enumerate(self.configs):
                if self.stop.is_set():
                    break
                if n and self.settings.cooldown_s:
                    self.stop.wait(self.settings.cooldown_s)
                record = self._measure(config, paths)
                if self.stop.is_set():
                    break  # cut short by Ctrl-C: not a figure, and not a failure of the configuration
                self.store.add_result(record)
                done += 1
                self.advance(1)
            if not self.stop.is_set():
                self.store.set_host(self.key, facts_after=self.target.facts())
        except BenchError as error:
            if not self.stop.is_set():
                self.store.set_host(self.key, error=str(error))
        except Exception as error:
            # A bug: the thread prints its traceback, and the host's error keeps the exit code from
            # saying "all measured" when this host measured nothing.
            self.store.set_host(self.key, error=f"internal error: {type(error).__name__}: {error}")
            raise
        finally:
            self.advance(len(self.configs) - done)
            self.target.close()

    def _stage_models(self) -> Dict[int, object]:
        """Each model's path on the device, or the error that kept it off the device."""
        paths: Dict[int, object] = {}
        for index, entry in enumerate(self.models):
            try:
                path, manifest = self.target.stage(entry)
            except BenchError as error:
                paths[index] = error
                continue
            if manifest is not None:  # a deployed model: its manifest fills in the figures
                with self.models_lock:
                    _fill_from_manifest(entry, manifest)
            paths[index] = path
        return paths

    def _measure(self, config: Config, paths: Dict[int, object]) -> Dict[str, object]:
        path = paths[config.model]
        if isinstance(path, Exception):
            return failed_record(self.key, self.models, config, str(path))
        try:
            envelope = self.target.bench(path, config.kernels, config.threads, self.options)
        except BenchError as error:
            if self.stop.is_set():
                raise
            # The connection dropped or the device hung mid-configuration: record it, reconnect, carry on.
            record = failed_record(self.key, self.models, config, str(error))
            if isinstance(error, TargetTimeout):
                record["status"] = "timeout"
            self._reconnect()
            return record
        return make_record(self.key, self.models, config, envelope, self.options.timeout_s)

    def _reconnect(self) -> None:
        self.target.close()
        self.target.open()


def _fill_from_manifest(entry: ModelEntry, manifest: Dict[str, object]) -> None:
    from benchmarks.sweep_plan import entry_from_manifest

    found = entry_from_manifest(entry.label, manifest)
    for name in ("sparsity", "accuracy", "method", "level"):
        if getattr(entry, name) is None:
            setattr(entry, name, getattr(found, name))


def run_sweep(targets: Sequence[Target], models: Sequence[ModelEntry], configs: Sequence[Config],
              options: BenchOptions, settings: SweepSettings, store: ResultsStore,
              progress: Optional[Callable[[int], None]] = None) -> None:
    """Run ``configs`` on every target (hosts in parallel, bounded by ``settings.jobs``).

    Results land in ``store`` as they arrive. On Ctrl-C every target is aborted (remote processes
    killed) and KeyboardInterrupt is re-raised once the threads have stopped.
    """
    stop = threading.Event()
    lock = threading.Lock()
    advance = progress or (lambda n: None)
    slots = threading.BoundedSemaphore(settings.jobs or len(targets))
    runs = [HostRun(t, models, configs, options, settings, store, advance, stop, lock) for t in targets]

    def work(run: HostRun) -> None:
        with slots:
            if not stop.is_set():
                run.run()
            else:
                advance(len(configs))

    threads = [threading.Thread(target=work, args=(run,), name=f"bench-{run.key}", daemon=True) for run in runs]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)  # short joins keep the main thread responsive to Ctrl-C
    except KeyboardInterrupt:
        stop.set()
        for run in runs:
            run.target.abort()  # cuts each connection at once: no thread waits on a device any more
        deadline = time.monotonic() + 5
        for thread in threads:
            # Daemon threads: one still stuck after the connections were cut must not hold Ctrl-C up.
            thread.join(max(deadline - time.monotonic(), 0))
        raise
    store.set_models([m.describe() for m in models])  # deployed models may have gained their figures


def settings_summary(options: BenchOptions, settings: SweepSettings, kernels: List[str],
                     threads: List[int], temp_limit_c: float) -> Dict[str, object]:
    """The sweep's settings as recorded in results.json."""
    return {**asdict(options), **asdict(settings), "kernels": kernels, "threads": threads,
            "temp_limit_c": temp_limit_c}
