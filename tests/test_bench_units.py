"""`edgeprune bench` pieces that need no device: the plan, the warnings, the supervisor, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.device_facts import SUPERVISOR_SCRIPT, throttle_warnings, temperature_warnings
from benchmarks.sweep_plan import ModelEntry, parse_kernels, plan
from tests.bench_fixtures import kill_leftovers, processes_matching, wait_for


def test_plan_interleaves_models_and_adds_the_ort_reference():
    models = [ModelEntry("a", sparsity=0.9), ModelEntry("b", sparsity=0.0), ModelEntry("c", sparsity=0.95)]
    configs = plan(models, ["sparse", "dense"], [1, 4])
    # The dense model (b) under stock onnxruntime is measured once per thread count, for the speed-up.
    assert [(c.model, c.kernels, c.threads, c.reference_only) for c in configs] == [
        (1, "ort", 1, True), (0, "sparse", 1, False), (1, "sparse", 1, False), (2, "sparse", 1, False),
        (0, "dense", 1, False), (1, "dense", 1, False), (2, "dense", 1, False),
        (1, "ort", 4, True), (0, "sparse", 4, False), (1, "sparse", 4, False), (2, "sparse", 4, False),
        (0, "dense", 4, False), (1, "dense", 4, False), (2, "dense", 4, False)]
    with_ort = plan(models, ["ort"], [1])
    assert [c.reference_only for c in with_ort] == [False, False, False]


def test_parse_kernels_rejects_unknown_choices():
    assert parse_kernels("ort, sparse,ort") == ["ort", "sparse"]
    with pytest.raises(Exception, match="unknown fast"):
        parse_kernels("ort,fast")


def test_throttle_warnings_tell_new_from_old_throttling():
    assert throttle_warnings("pi", 0, [0, 0]) == []
    assert throttle_warnings("pi", None, [None]) == []
    during = throttle_warnings("pi", 0, [0x0, 0x50000])  # under-voltage and throttling occurred
    assert len(during) == 1 and "THROTTLED" in during[0] and "under-voltage occurred" in during[0]
    now = throttle_warnings("pi", 0x0, [0x4])  # "throttled now" at one reading
    assert "THROTTLED" in now[0] and "throttled now" in now[0]
    old = throttle_warnings("pi", 0x50000, [0x50000])  # happened since boot, before the sweep
    assert len(old) == 1 and "THROTTLED" not in old[0] and "since boot" in old[0]


def test_temperature_warning_at_the_limit():
    assert temperature_warnings("pi", [55.0, None, 79.9], 80.0) == []
    assert "81.0 °C" in temperature_warnings("pi", [55.0, 81.0], 80.0)[0]


def _supervise(*command: str, timeout: float):
    done = subprocess.run([sys.executable, str(SUPERVISOR_SCRIPT), "--timeout", str(timeout), "--", *command],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_supervisor_reports_output_exit_code_and_timeout():
    ok = _supervise(sys.executable, "-c", "import sys; print('{}'); sys.exit(3)", timeout=30)
    assert (ok["returncode"], ok["timed_out"], ok["stdout"].strip()) == (3, False, "{}")
    marker = "supervisor-timeout-marker"
    try:
        slow = _supervise(sys.executable, "-c", "import time; time.sleep(60)", marker, timeout=0.5)
        assert slow["timed_out"] and slow["wall_s"] < 10
        assert processes_matching(marker) == []  # the whole process group was killed
    finally:
        kill_leftovers(marker)


def test_supervisor_kills_the_benchmark_when_its_starter_dies():
    """What happens on the device when the SSH connection drops: the starter (sshd) goes away."""
    marker = "supervisor-orphan-marker"
    starter = subprocess.Popen([
        sys.executable, "-c",
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, {str(SUPERVISOR_SCRIPT)!r}, '--timeout', '120', '--', "
        f"sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}]); time.sleep(120)"])
    try:
        # The benchmark itself, not the supervisor (whose command line holds the benchmark's): once it
        # runs, the supervisor has recorded who started it.
        wait_for(lambda: processes_matching(marker, exclude="bench_supervisor"), 20, "the benchmark to start")
        starter.kill()
        starter.wait()
        wait_for(lambda: not processes_matching(marker), 10, "the orphaned benchmark to be killed")
    finally:
        starter.kill()
        kill_leftovers(marker)


def test_missing_model_dir_is_one_line_and_writes_nothing(bench_cli, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = bench_cli("local", tmp_path / "nope", "--out", out)
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "nope" in err and "not a directory" in err
    assert not out.exists()


def test_corrupt_manifest_and_bad_flags_are_user_errors(bench_cli, bench_models, tmp_path):
    import shutil

    corrupt = shutil.copytree(bench_models["dense"], tmp_path / "corrupt")
    (corrupt / "manifest.json").write_text('{"format": "edgeprune-model", ')
    code, _, err = bench_cli("local", corrupt, "--out", tmp_path / "o1")
    assert code == 2 and "manifest.json is not valid JSON" in err and "Traceback" not in err
    code, _, err = bench_cli("local", bench_models["dense"], "--kernels", "ort,turbo", "--out", tmp_path / "o2")
    assert code == 2 and "turbo" in err
    code, _, err = bench_cli("local", "some-deployed-name", "--out", tmp_path / "o3")
    assert code == 2 and "not a directory" in err
    code, _, err = bench_cli("local", "--out", tmp_path / "o4")
    assert code == 2 and "nothing to measure" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_earlier_results_are_never_overwritten_silently(bench_cli, bench_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}')
    code, _, err = bench_cli("local", bench_models["dense"], "--out", out)
    assert code == 2 and "--overwrite" in err
    assert (out / "results.json").read_text() == '{"mine": true}'


def test_each_architecture_has_its_own_reference():
    small = [ModelEntry(f"s{i}", sparsity=s, family="[[10, 64]]") for i, s in enumerate((0.9, 0.0))]
    wide = [ModelEntry(f"w{i}", sparsity=s, family="[[2048, 64]]") for i, s in enumerate((0.5, 0.95))]
    configs = plan(small + wide, ["sparse"], [1])
    # s1 (dense small) and w0 (least sparse wide) under ort, then the sweep itself.
    assert [(c.model, c.kernels) for c in configs if c.reference_only] == [(1, "ort"), (2, "ort")]


def test_repeated_model_names_say_where_they_came_from(tmp_path):
    from benchmarks.sweep_plan import ModelEntry, unique_labels

    entries = [ModelEntry(label="model", local_dir=tmp_path / "runs" / "a" / "model"),
               ModelEntry(label="model", local_dir=tmp_path / "runs" / "b" / "model"),
               ModelEntry(label="dense", local_dir=tmp_path / "dense")]
    assert unique_labels(entries) == ["model (runs/a)", "model (runs/b)", "dense"]


def test_results_files_follow_the_umask(tmp_path):
    import os
    import stat

    from benchmarks.results_store import write_json_atomically

    previous = os.umask(0o022)
    try:
        write_json_atomically(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
