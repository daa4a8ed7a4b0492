"""`edgeprune bench local ...`: real MODEL_DIRs, real `python -m edge_runtime bench` processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_fixtures import FAST, HANGING, kill_leftovers, processes_matching, read_results, wait_for

OUTPUTS = ("results.json", "results.csv", "report.md", "latency_vs_sparsity.png", "accuracy_vs_latency.png")


def test_two_levels_give_every_file_with_consistent_figures(bench_cli, bench_models, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = bench_cli("local", bench_models["dense"], bench_models["sparse90"],
                                  "--kernels", "ort,sparse", *FAST, "--out", out)
    assert code == 0, err
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    # stderr is not a terminal here: a plain line per configuration instead of a bar (or of silence)
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("bench: ")] == [
        f"bench: {n}/4 configurations measured" for n in range(1, 5)]

    data = read_results(out)
    assert data["complete"] and not data["interrupted"] and data["warnings"] == []
    records = data["results"]
    # Interleaved: both models under one kernel choice before the next.
    assert [(r["kernels"], r["model"]) for r in records] == [
        ("ort", "dense"), ("ort", "sparse90"), ("sparse", "dense"), ("sparse", "sparse90")]
    manifests = {name: json.loads((bench_models[name] / "manifest.json").read_text()) for name in ("dense", "sparse90")}
    for record in records:
        bench = record["bench"]
        assert record["status"] == "ok" and bench["kernels"] == record["kernels"] and bench["threads"] == 1
        latency = bench["latency_ms"]
        assert bench["iterations"] >= 20 and latency["min"] <= latency["p50"] <= latency["p99"] <= latency["max"]
        assert bench["peak_rss_mb"] > 0
        assert bench["model"]["sparsity"] == pytest.approx(manifests[record["model"]]["sparsity"])
    facts = data["hosts"]["local"]["facts_before"]
    assert facts["python"] == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert facts["cores"]["logical"] == os.cpu_count() and facts["libraries"]["onnxruntime"]

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records)
    reference = records[0]["bench"]["latency_ms"]["p50"]  # dense under ort
    for row, record in zip(rows, records):
        p50 = record["bench"]["latency_ms"]["p50"]
        assert (row["model"], row["kernels"]) == (record["model"], record["kernels"])
        assert float(row["p50_ms"]) == p50
        assert float(row["speedup_vs_ort_dense"]) == pytest.approx(reference / p50)
        assert float(row["accuracy"]) == manifests[record["model"]]["accuracy"]

    report = (out / "report.md").read_text()
    assert "WARNING" not in report and "Partial" not in report
    assert "| dense | 0.0% | 95.0% |" in report and "| sparse90 | 90.0% | 93.0% |" in report
    assert "| ort | 1 |" in report and "1.00×" in report
    assert "| sparse90 |" in stdout  # the table is printed too


def test_a_crash_and_a_hang_are_reported_and_the_sweep_goes_on(bench_cli, bench_models, hanging_python, tmp_path):
    out = tmp_path / "out"
    try:
        code, _, err = bench_cli("local", bench_models["dense"], bench_models["hang-me"], bench_models["broken"],
                                 bench_models["sparse90"], "--kernels", "ort", *FAST, "--config-timeout", "3",
                                 "--python", hanging_python, "--out", out)
        assert code == 1, err
        assert processes_matching(HANGING) == []  # the hung benchmark was killed, not left behind
    finally:
        kill_leftovers(HANGING)
    status = {r["model"]: (r["status"], r["error"]) for r in read_results(out)["results"]}
    assert status["dense"] == ("ok", None) and status["sparse90"] == ("ok", None)
    assert status["hang-me"][0] == "timeout" and "3 s" in status["hang-me"][1]
    assert status["broken"][0] == "failed" and status["broken"][1].startswith("exit ")
    report = (out / "report.md").read_text()
    assert "## Failed configurations" in report
    assert "| local | hang-me | ort | 1 | TIMEOUT |" in report and "| local | broken | ort | 1 | FAILED |" in report
    assert "| sparse90 | 90.0%" in report  # the model measured after the failures still has its row


def test_an_interrupted_sweep_keeps_its_results(bench_models, hanging_python, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "edgeprune", "bench", "local", str(bench_models["dense"]),
            str(bench_models["hang-me"]), str(bench_models["sparse90"]), "--kernels", "ort", *FAST,
            "--python", str(hanging_python), "--out", str(out)]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: processes_matching(HANGING, exclude="bench_supervisor"), 60, "the hanging configuration")
        assert len(read_results(out)["results"]) == 1  # the first model is already saved
        sweep.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = sweep.communicate(timeout=60)
        assert sweep.returncode == 130 and "interrupted" in err and "Traceback" not in err
        wait_for(lambda: not processes_matching(HANGING), 10, "the interrupted benchmark to be killed")
    finally:
        sweep.kill()
        kill_leftovers(HANGING)
    data = read_results(out)
    assert data["interrupted"] and not data["complete"]
    assert [(r["model"], r["status"]) for r in data["results"]] == [("dense", "ok")]
    assert "Partial results" in (out / "report.md").read_text()
    assert (out / "results.csv").read_text().count("\n") == 2  # header + the one measured configuration


def test_the_report_warns_when_the_device_throttled(bench_cli, bench_models, fake_vcgencmd, tmp_path):
    out = tmp_path / "out"
    code, _, err = bench_cli("local", bench_models["sparse90"], "--kernels", "ort", *FAST, "--out", out)
    assert code == 0, err
    data = read_results(out)
    assert data["hosts"]["local"]["facts_before"]["throttled"] == 0x50005
    assert data["results"][0]["temperature_c_after"] == 83.5
    report = (out / "report.md").read_text()
    assert "⚠ WARNING: local THROTTLED during the sweep" in report and "under-voltage now" in report
    assert "reached 83.5 °C during the sweep (limit 80 °C)" in report
    assert "0x50005" in report
    assert "WARNING" in err


def test_bench_a_compress_run_by_level(bench_cli, tmp_path):
    from tests.compressor_fixtures import run_tiny

    run_dir = tmp_path / "run"
    run_tiny(run_dir, methods=("lr-rewind",), epochs=1, lr_drops=(), target_sparsity=0.3)  # levels 0, 1, 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    levels = {e["level"]: e for e in metrics["methods"]["lr-rewind"]}
    out = tmp_path / "out"
    code, _, err = bench_cli("local", "--run", run_dir, "--levels", "0,2", "--kernels", "ort,sparse", *FAST,
                             "--out", out)
    assert code == 0, err
    data = read_results(out)
    assert [m["label"] for m in data["models"]] == ["dense", "lr-rewind-level2"]
    for model, level in zip(data["models"], (0, 2)):
        assert model["accuracy"] == pytest.approx(levels[level]["accuracy"])
        assert model["sparsity"] == pytest.approx(levels[level]["sparsity"])
    assert len(data["results"]) == 4 and all(r["status"] == "ok" for r in data["results"])
    assert all((out / name).exists() for name in OUTPUTS)
    assert (out / "models" / "lr-rewind-level2" / "manifest.json").is_file()

    # Again into the same --out: this run's exports are reused as they are ...
    exported = out / "models" / "dense" / "manifest.json"
    stamp = exported.stat().st_mtime_ns
    again = ("--levels", "0", "--kernels", "ort", *FAST, "--out", out, "--overwrite")
    code, _, err = bench_cli("local", "--run", run_dir, *again)
    assert code == 0, err
    assert exported.stat().st_mtime_ns == stamp
    # ... but another run's level under the same name is exported afresh, never measured as this one's.
    import shutil

    other = Path(shutil.copytree(run_dir, tmp_path / "other-run"))
    code, _, err = bench_cli("local", "--run", other, *again)
    assert code == 0, err
    assert json.loads(exported.read_text())["source"]["run_dir"] == str(other.resolve())
