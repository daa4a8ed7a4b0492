"""The `edgeprune` front: lazy dispatch, one-line errors, and the demo end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("command", ["deploy", "ls", "rollback", "bench"])
def test_device_side_commands_never_import_torch(command):
    done = _python(
        "import sys\n"
        "from edgeprune.cli import main\n"
        f"try: main(['{command}', '--help'])\n"
        "except SystemExit: pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'paramiko' in sys.modules)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO-TORCH False")  # --help loads neither torch nor paramiko


def test_top_level_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "edgeprune", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("demo", "compress", "export", "deploy", "ls", "rollback", "bench"):
        assert f"    {command}" in done.stdout


def test_no_command_is_a_usage_error_with_the_overview():
    done = subprocess.run([sys.executable, "-m", "edgeprune"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "compress" in done.stderr and "Traceback" not in done.stderr


def test_unknown_command_is_an_argparse_error_not_a_traceback():
    done = subprocess.run([sys.executable, "-m", "edgeprune", "frobnicate"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "invalid choice" in done.stderr


@pytest.mark.slow
def test_demo_runs_compress_export_and_bench_end_to_end(tmp_path):
    out = tmp_path / "demo"
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "edgeprune", "demo", "--out", str(out), "--model", "digits-mlp",
         "--target-sparsity", "0.6", "--epochs", "2", "--readme-sample", str(readme)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the README's sample has the shape a fresh demo prints: same lines and columns, numbers masked
    from edgeprune.demo import readme_block, sample_shape

    fresh, shipped = readme.read_text(), (REPO / "README.md").read_text()
    assert sample_shape(fresh[slice(*readme_block(fresh))]) == sample_shape(shipped[slice(*readme_block(shipped))])
    assert "bench: 1/" in done.stderr  # piped: a line per configuration
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    levels = metrics["methods"]["lr-rewind"]
    assert levels[-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["format"] == "edgeprune-model"
    results = json.loads((out / "bench" / "results.json").read_text())
    assert results["complete"] and all(r["status"] == "ok" for r in results["results"])
    measured = {r["bench"]["kernels"] for r in results["results"]}
    assert measured == {"ort", "auto"}
    # The printed table carries accuracy, sparsity and latency side by side.
    assert "| model | sparsity | accuracy |" in done.stdout and "p50 ms" in done.stdout

    # Running the demo again just works: the finished run is continued (nothing retrained), not refused.
    final = out / "run" / "lr-rewind" / f"level_{levels[-1]['level']}" / "final.pt"
    trained_at = final.stat().st_mtime_ns
    again = subprocess.run(done.args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final.stat().st_mtime_ns == trained_at
    assert "| model | sparsity | accuracy |" in again.stdout


def test_the_readme_sample_has_the_columns_bench_prints_now():
    """Cheap guard beside the slow demo test: the README's sample table has today's header."""
    from benchmarks.report import results_table
    from edgeprune.demo import readme_block, sample_shape

    text = (REPO / "README.md").read_text()
    lines, rows = sample_shape(text[slice(*readme_block(text))])
    row = {"status": "ok", "model": "m", "reference_only": False, "sparsity": 0.5, "accuracy": 0.9,
           "size_bytes": 1000, "variant": "fp32", "kernels": "ort", "engine": "ort", "threads": 1, "p50_ms": 0.1,
           "p90_ms": 0.1, "throughput_per_s": 10.0, "peak_rss_mb": 1.0, "speedup_vs_ort_dense": 1.0}
    header = results_table([row], several_hosts=False).splitlines()[:2]
    assert lines[-2:] == header and lines[0].startswith("exported ") and len(rows) >= 2
    assert all(len(cells) == len(header[0].strip("|").split("|")) for cells in rows)
