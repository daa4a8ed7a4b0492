"""``edge-runtime`` run / check / info / tune / bench on real MODEL_DIRs (torch-free)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.runtime_fixtures import copy_model_dir, example_input, torch_output

REPO = Path(__file__).resolve().parent.parent
LATENCY_KEYS = {"mean", "std", "min", "p50", "p90", "p95", "p99", "max"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_run_writes_the_output(tmp_path: Path) -> None:
    target = copy_model_dir("digits-cnn", tmp_path)
    np.save(tmp_path / "x.npy", example_input("digits-cnn"))
    done = cli("run", str(target), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
               "--kernels", "sparse", "--threads", "2")
    assert done.returncode == 0, done.stderr
    y = np.load(tmp_path / "y.npy")
    assert np.max(np.abs(y - torch_output("digits-cnn"))) <= 1e-4


def test_check_detects_a_wrong_sample(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    done = cli("check", str(target), "--kernels", "sparse")
    assert done.returncode == 0 and done.stdout.startswith("ok "), done.stderr
    # Same weights, other expected output: rewrite the sample inside a rebuilt npz + manifest hash.
    import edge_runtime.model_dir as md
    with np.load(target / "weights.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["sample.output"] = arrays["sample.output"] + 1.0
    np.savez(target / "weights.npz", **arrays)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["weights.npz"] = md.sha256_of(target / "weights.npz")
    (target / "manifest.json").write_text(json.dumps(manifest))
    done = cli("check", str(target), "--kernels", "dense")
    assert done.returncode == 1 and "FAIL" in done.stderr


def test_tune_caches_a_plan_that_auto_reuses(tmp_path: Path) -> None:
    from edge_runtime import InferenceSession

    target = copy_model_dir("mlp-block", tmp_path)
    done = cli("tune", str(target), "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["engine"] in ("native", "ort") and plan["ort_ms"] > 0 and plan["native_ms"] > 0
    assert set(plan["layers"]) == {"up.weight", "down.weight"}
    assert set(plan["layers"].values()) <= {"dense", "sparse"}
    assert (target / "plans.json").is_file()
    session = InferenceSession(target, kernels="auto", threads=1)
    assert session.plan["cached"] is True and session.plan["layers"] == plan["layers"]
    info = cli("info", str(target), "--threads", "1")
    assert info.returncode == 0 and "up" in info.stdout and f"engine {plan['engine']}" in info.stdout


def test_bench_json_has_the_documented_fields(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    for kernels in ("auto", "ort", "sparse"):
        done = cli("bench", str(target), "--kernels", kernels, "--threads", "1", "--warmup", "1",
                   "--iters", "5", "--min-seconds", "0", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert set(report["latency_ms"]) == LATENCY_KEYS
        assert report["iterations"] >= 5 and report["kernels"] == kernels and report["threads"] == 1
        assert report["latency_ms"]["min"] <= report["latency_ms"]["p50"] <= report["latency_ms"]["max"]
        for key in ("load_s", "first_ms", "throughput_per_s", "peak_rss_mb"):
            assert report[key] > 0
        # throughput is runs per second of running (as onnxruntime_perf_test reports it), not 1000 / p50
        assert report["throughput_per_s"] == pytest.approx(report["iterations"] / report["timed_s"], rel=1e-2)
        assert report["timed_s"] * 1e3 >= report["iterations"] * report["latency_ms"]["min"]
        assert report["model"]["size_bytes"] == sum(p.stat().st_size for p in target.iterdir()
                                                    if p.name != "plans.json")
        assert abs(report["model"]["sparsity"] - 0.9) < 0.01
        assert {"machine", "cpu", "cores", "python", "numpy", "scipy", "onnxruntime"} <= set(report["device"])
    assert report["engine"] == "native"
    assert (target / "plans.json").is_file()  # auto tuned first (in a child process)
    text = cli("bench", str(target), "--kernels", "ort", "--threads", "1", "--iters", "3", "--min-seconds", "0")
    assert text.returncode == 0 and " 1 thread, batch 1" in text.stdout, text.stdout


def test_counts_read_in_the_number_they_need() -> None:
    from edge_runtime.wording import counted

    assert [counted(n, "thread") for n in (0, 1, 4)] == ["0 threads", "1 thread", "4 threads"]
    assert counted(2, "child", "children") == "2 children"


def test_version() -> None:
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("edge-runtime ")


def test_info_into_a_pipe_that_closes_early_ends_quietly(tmp_path):
    target = copy_model_dir("digits-mlp", tmp_path)
    # `| head -1` closes the pipe after one line; a model with many lines makes the write fail for sure
    done = subprocess.run(f"{sys.executable} -m edge_runtime info {target} | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("MODEL_DIR") and done.stderr == ""
    info = subprocess.run([sys.executable, "-m", "edge_runtime", "info", str(target)], capture_output=True,
                          text=True, timeout=120)
    assert "bytes" not in info.stdout.splitlines()[2] and "KiB" in info.stdout  # sizes in human units
