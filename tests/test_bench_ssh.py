"""`edgeprune bench USER@HOST:PORT ...` against real OpenSSH servers on 127.0.0.1."""

from __future__ import annotations

import os
import time

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_fixtures import FAST, kill_leftovers, processes_matching, read_results, ssh_args, wait_for

pytestmark = pytest.mark.sshd


def test_ssh_sweep_of_two_levels(bench_cli, bench_models, bench_device_root, sshd, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = bench_cli(sshd.spec, bench_models["dense"], bench_models["sparse90"], "--kernels",
                                  "ort,sparse", *FAST, "--out", out, *ssh_args(sshd, bench_device_root))
    assert code == 0, err
    data = read_results(out)
    assert data["complete"] and len(data["results"]) == 4
    assert all(r["status"] == "ok" and r["host"] == sshd.spec for r in data["results"])
    for record in data["results"]:  # run on the device, from its scratch copy of the model
        assert record["bench"]["model"]["path"].startswith(str(bench_device_root / "scratch" / "model-"))
    assert not (bench_device_root / "models").exists()  # bench never touches deployed releases
    assert data["hosts"][sshd.spec]["facts_before"]["python"] and data["hosts"][sshd.spec]["facts_after"]
    report = (out / "report.md").read_text()
    assert f"| {sshd.spec} |" in report.splitlines()[4] and "| sparse90 | 90.0% |" in report
    for name in ("results.csv", "latency_vs_sparsity.png", "accuracy_vs_latency.png"):
        assert (out / name).stat().st_size > 0

    # A second sweep reuses the uploaded copies instead of sending the models again, and removes
    # scratch copies unused for a week (here: one aged by hand), so a busy device does not fill up.
    scratch = sorted(p.name for p in (bench_device_root / "scratch").iterdir())
    stale = bench_device_root / "scratch" / "model-0123456789abcdef"
    stale.mkdir()
    old = time.time() - 8 * 86400
    os.utime(stale, (old, old))
    code, _, err = bench_cli(sshd.spec, bench_models["sparse90"], "--kernels", "sparse", *FAST,
                             "--out", tmp_path / "again", *ssh_args(sshd, bench_device_root))
    assert code == 0, err
    assert sorted(p.name for p in (bench_device_root / "scratch").iterdir()) == scratch


def test_a_fleet_side_by_side_with_a_dead_host(bench_cli, bench_models, bench_device_root, sshd_factory, tmp_path):
    a, b, dead = sshd_factory.start(), sshd_factory.start(), sshd_factory.start()
    dead.kill()
    out = tmp_path / "out"
    code, _, err = bench_cli(f"{a.spec},{b.spec},{dead.spec}", bench_models["sparse90"], "--kernels", "ort",
                             *FAST, "--out", out, *ssh_args(a, bench_device_root))
    assert code == 1, err  # some host failed, the others were measured
    data = read_results(out)
    assert {r["host"] for r in data["results"]} == {a.spec, b.spec}
    assert all(r["status"] == "ok" for r in data["results"])
    assert "connection refused" in data["hosts"][dead.spec]["error"]
    report = (out / "report.md").read_text()
    assert "## Side by side (p50 ms)" in report
    assert f"| model | kernels | threads | {a.spec} p50 ms | {b.spec} p50 ms | {dead.spec} p50 ms |" in report


def _remote_benchmark(root: Path):
    """The `edge_runtime bench` process the device runs for a sweep under ``root`` (not its supervisor)."""
    return lambda: processes_matching(f"edge_runtime bench {root}", exclude="bench_supervisor")


def test_ctrl_c_kills_the_remote_benchmark(bench_models, bench_device_root, sshd, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "edgeprune", "bench", sshd.spec, str(bench_models["dense"]), "--kernels", "ort",
            "--min-seconds", "600", "--out", str(out), *map(str, ssh_args(sshd, bench_device_root))]
    sweep = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**__import__("os").environ, "HOME": str(tmp_path)})
    running = _remote_benchmark(bench_device_root)
    try:
        wait_for(running, 60, "the remote benchmark to start")
        sweep.send_signal(signal.SIGINT)
        _, err = sweep.communicate(timeout=60)
        assert sweep.returncode == 130 and "Traceback" not in err
        wait_for(lambda: not running(), 15, "the remote benchmark to be killed")
    finally:
        sweep.kill()
        kill_leftovers(f"edge_runtime bench {bench_device_root}")
    data = read_results(out)
    assert data["interrupted"] and data["results"] == []


def test_a_dropped_connection_kills_the_remote_benchmark_and_is_reported(bench_cli, bench_models, bench_device_root,
                                                                        sshd, tmp_path):
    import threading

    running = _remote_benchmark(bench_device_root)

    def drop_when_running() -> None:
        wait_for(running, 60, "the remote benchmark to start")
        sshd.kill_sessions()  # every connection to the device drops at once; sshd itself lives on

    dropper = threading.Thread(target=drop_when_running)
    dropper.start()
    try:
        code, _, err = bench_cli(sshd.spec, bench_models["dense"], "--kernels", "ort", "--min-seconds", "600",
                                 "--out", tmp_path / "out", *ssh_args(sshd, bench_device_root))
        dropper.join()
        wait_for(lambda: not running(), 15, "the orphaned remote benchmark to be killed")
    finally:
        kill_leftovers(f"edge_runtime bench {bench_device_root}")
    assert code == 1, err
    record = read_results(tmp_path / "out")["results"][0]
    assert record["status"] == "failed" and record["error"].startswith(sshd.spec)  # deploy's ConnectionLost line


def test_clean_removes_bench_uploads_and_nothing_else(bench_cli, sshd, tmp_path):
    root = tmp_path / "root"
    (root / "scratch" / "model-0123456789abcdef").mkdir(parents=True)
    (root / "scratch" / "model-0123456789abcdef" / "weights.npz").write_bytes(b"x" * 4096)
    (root / "models" / "m" / "releases").mkdir(parents=True)
    code, _, err = bench_cli(sshd.spec, "--clean", *sshd.cli_args(), "-F", "/dev/null", "--remote-root", root)
    assert code == 0 and f"removed {root / 'scratch'}" in err, err
    assert not (root / "scratch").exists() and (root / "models" / "m" / "releases").is_dir()
    code, _, err = bench_cli(sshd.spec, "--clean", *sshd.cli_args(), "-F", "/dev/null", "--remote-root", root)
    assert code == 0 and "nothing to clean" in err, err
