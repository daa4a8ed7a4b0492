"""`edgeprune bench` against devices that lie or flood (issue 20, medium items):

- a device that returns bad bench data (a string, a list, NaN where figures belong) gives a failed
  row with a one-line reason; report.md, results.csv and the plots are still written, and
  results.json stays strict JSON (before: a TypeError traceback in benchmarks/report.py, exit 1,
  only results.json written; NaN reached report.md as ``nan×`` and results.json as bare NaN);
- a device that prints 300 MiB does not make the workstation (or the device's supervisor) keep it:
  the output is cut at a few MiB and the row says so in one line (before: 966 MB RSS).

The "devices" are stubs behind the real parts: a ``--python`` wrapper for the local target (the real
supervisor runs it), and real sshd servers whose ForceCommand answers bench's command itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_fixtures import FAST, read_results, ssh_args

FLOOD_MIB = 300

# A real report's shape (edge-runtime bench --json), to be spoiled one field at a time.
GOOD = {"load_s": 0.01, "first_ms": 0.2, "latency_ms": {"mean": 0.1, "std": 0.01, "min": 0.09, "p50": 0.1,
                                                         "p90": 0.12, "p95": 0.13, "p99": 0.14, "max": 0.2},
        "throughput_per_s": 10000.0, "peak_rss_mb": 50.0, "iterations": 20, "batch": 1, "kernels": "ort",
        "engine": "ort", "threads": 1, "variant": {"name": "fp32", "accuracy": 0.93, "size": 1000},
        "model": {"path": "/x", "sparsity": 0.9, "size_bytes": 1000}}


def _spoiled(**changes) -> dict:
    report = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, name = dotted.split("__")
        target = report
        for parent in parents:
            target = target[parent]
        target[name] = value
    return report


BAD = {  # model folder name -> (what the device prints, the field the failed row must name)
    "p50-fast": (json.dumps(_spoiled(latency_ms__p50="fast")), "latency_ms.p50"),
    "latency-list": (json.dumps(_spoiled(latency_ms=[1, 2, 3])), "latency_ms"),
    "size-big": (json.dumps(_spoiled(variant__size="big")), "variant.size"),
    "rss-a": (json.dumps(_spoiled(peak_rss_mb="a")), "peak_rss_mb"),
    "p50-nan": (json.dumps(_spoiled(latency_ms__p50=float("nan"))), "NaN"),
    "p90-inf": (json.dumps(_spoiled(latency_ms__p90=float("inf"))), "Infinity"),
    "a-list": ("[1, 2]", "not an object"),
}


def _strict(text: str) -> object:
    """json.loads that fails on NaN/Infinity, as any strict JSON reader does."""
    def refuse(name: str) -> object:
        raise ValueError(f"non-strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def lying_python(tmp_path) -> Path:
    """A ``--python`` that is this interpreter, except for benchmarking a model folder holding a file
    ``payload`` (printed instead of a report) or ``flood`` (FLOOD_MIB MiB of output)."""
    script = tmp_path / "python-that-lies"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "edge_runtime" ]; then
  if [ -f "$4/payload" ]; then exec cat "$4/payload"; fi
  if [ -f "$4/flood" ]; then
    exec {sys.executable} -c "import sys; [sys.stdout.buffer.write(b'x' * (1 << 20)) for _ in range({FLOOD_MIB})]"
  fi
fi
exec {sys.executable} "$@"
""")
    script.chmod(0o755)
    return script


def _copy(source: Path, folder: Path, name: str, content: str) -> Path:
    copy = Path(shutil.copytree(source, folder))
    (copy / name).write_text(content)
    return copy


def test_bad_bench_data_is_a_failed_row_and_every_output_is_written(bench_cli, bench_models, lying_python,
                                                                     tmp_path):
    models = [_copy(bench_models["sparse90"], tmp_path / name, "payload", text) for name, (text, _) in BAD.items()]
    out = tmp_path / "out"
    code, stdout, err = bench_cli("local", bench_models["dense"], *models, "--kernels", "ort", *FAST,
                                  "--python", lying_python, "--out", out)
    assert code == 1, err  # some configurations failed; no traceback, no crash
    data = _strict((out / "results.json").read_text())
    by_model = {r["model"]: r for r in data["results"]}
    assert by_model["dense"]["status"] == "ok"
    for name, (_, field) in BAD.items():
        record = by_model[name]
        assert record["status"] == "failed" and record["bench"] is None, record
        assert field in record["error"] and "\n" not in record["error"], record["error"]
    report = (out / "report.md").read_text()
    results, failed = report.split("## Failed configurations")  # bad rows are listed as failed only
    assert "nan" not in results.lower() and "| dense |" in results and "p50-fast" in failed
    for name in ("results.csv", "latency_vs_sparsity.png", "accuracy_vs_latency.png"):
        assert (out / name).stat().st_size > 0
    assert ",nan," not in (out / "results.csv").read_text().lower()


def _peak_rss_mib_of(args, env) -> tuple:
    """Run ``python -m edgeprune ARGS`` under a parent that reports its children's peak RSS (MiB)."""
    wrapper = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "edgeprune", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    return done.returncode, int(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_a_device_printing_300_mib_locally_is_cut_and_memory_stays_bounded(bench_models, lying_python, tmp_path):
    flood = _copy(bench_models["sparse90"], tmp_path / "flood", "flood", "")
    out = tmp_path / "out"
    env = {**os.environ, "HOME": str(tmp_path)}
    code, peak_mib, err = _peak_rss_mib_of(["bench", "local", flood, "--kernels", "ort", *FAST, "--python",
                                            lying_python, "--out", out, "--no-progress"], env)
    assert code == 1 and "Traceback" not in err, err
    assert peak_mib < 250, f"peak RSS {peak_mib} MiB while the benchmark printed {FLOOD_MIB} MiB"
    record = read_results(out)["results"][0]
    assert record["status"] == "failed" and "cut" in record["error"] and "\n" not in record["error"], record


def _stub_server(sshd_factory, folder: Path, answer: str):
    """A real sshd whose every bench configuration (a bench_supervisor.py command) runs ``answer``
    (shell) instead; everything else (runtime check, uploads, facts) runs as on a real device."""
    folder.mkdir(parents=True, exist_ok=True)
    force = folder / "force-command"
    force.write_text(f"""#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
  /usr/lib/openssh/sftp-server) exec /usr/lib/openssh/sftp-server ;;
  *bench_supervisor.py*) echo $$; {answer} ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
""")
    force.chmod(0o755)
    return sshd_factory.start(config=["Subsystem sftp /usr/lib/openssh/sftp-server", f"ForceCommand {force}"])


@pytest.mark.slow
@pytest.mark.sshd
def test_devices_that_flood_or_lie_over_ssh(bench_models, bench_device_root, sshd_factory, tmp_path):
    flood = f"exec {sys.executable} -c \"import sys; [sys.stdout.buffer.write(b'y' * (1 << 20)) " \
            f"for _ in range({FLOOD_MIB})]\""
    envelope = {"returncode": 0, "timed_out": False, "wall_s": "long", "stdout": json.dumps(_spoiled(
                latency_ms__p50=float("nan"))), "stderr": "", "temperature_c_before": [1],
                "temperature_c_after": "hot", "throttled_after": "0x5"}
    answer = tmp_path / "envelope.json"
    answer.write_text(json.dumps(envelope))
    chatty = _stub_server(sshd_factory, tmp_path / "chatty", flood)
    liar = _stub_server(sshd_factory, tmp_path / "liar", f"exec cat {answer}")
    out = tmp_path / "out"
    env = {**os.environ, "HOME": str(tmp_path)}
    code, peak_mib, err = _peak_rss_mib_of(["bench", f"{chatty.spec},{liar.spec}", bench_models["sparse90"],
                                            "--kernels", "ort", *FAST, "--out", out, "--no-progress",
                                            *ssh_args(chatty, bench_device_root)], env)
    assert code == 1 and "Traceback" not in err, err
    assert peak_mib < 250, f"peak RSS {peak_mib} MiB while a device printed {FLOOD_MIB} MiB"
    data = _strict((out / "results.json").read_text())
    by_host = {r["host"]: r for r in data["results"]}
    cut, lied = by_host[chatty.spec], by_host[liar.spec]
    assert cut["status"] == "failed" and "cut" in cut["error"] and "\n" not in cut["error"], cut
    assert lied["status"] == "failed" and "NaN" in lied["error"], lied
    assert lied["temperature_c_after"] is None and lied["throttled_after"] is None and lied["wall_s"] is None
    assert (out / "report.md").stat().st_size > 0 and (out / "results.csv").stat().st_size > 0
