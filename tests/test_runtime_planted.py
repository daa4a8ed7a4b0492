"""Files planted in a MODEL_DIR, and write targets that are no file (issue 20): the runtime never writes
outside the folder, never through a link, never hangs on or reads whole a hostile plans.json, and never
leaves a temp file behind when a write fails."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import plan as plans
from edge_runtime.cli import main
from tests.hostile_model_dirs import REPO, assert_one_line_error, cli
from tests.runtime_fixtures import copy_model_dir, example_input

VICTIM_TEXT = "precious\n"
PLANTED = 5000  # links at .NAME.PID.tmp for the next PIDs: the temp names the runtime used before


def _home(tmp_path: Path) -> dict:
    """An environment whose ~/.cache is inside the test's folder (where plans go when MODEL_DIR refuses)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}


def _plant_pid_links(folder: Path, victim: Path) -> None:
    """Symlinks to ``victim`` at every old-style temp name a process started from here could use: the
    whole pid range for plans.json when it is the usual 32768 (pids wrap), and the next pids for outputs."""
    try:
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        pid_max = 1 << 22
    first = os.getpid()
    whole = range(1, pid_max + 1) if pid_max <= 1 << 16 else range(max(first - 100, 1), first + PLANTED)
    for pid in whole:
        (folder / f".plans.json.{pid}.tmp").symlink_to(victim)
    for pid in range(max(first - 100, 1), first + PLANTED):
        for name in (f".y.npy.{pid}.tmp.npy", f".y.npz.{pid}.tmp.npz"):
            (folder / name).symlink_to(victim)


def _input(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, example_input("digits-mlp")[:1])
    return path


def test_links_planted_over_the_pid_range_are_never_written_through(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    _plant_pid_links(target, victim)
    env, x = _home(tmp_path), _input(tmp_path)
    for args in (["check", str(target)], ["tune", str(target)],
                 ["run", str(target), "--input", str(x), "--output", str(target / "y.npy"),
                  "--out", str(target / "y.npz")]):
        done = cli(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert victim.read_text() == VICTIM_TEXT and not victim.is_symlink()
    assert not (target / "plans.json").is_symlink() and plans.read_plans(target / "plans.json")
    assert not (target / "y.npy").is_symlink() and np.load(target / "y.npy").shape == (1, 10)
    # in this process the old name is known exactly: still not followed
    (target / "plans.json").unlink()
    from edge_runtime import InferenceSession
    InferenceSession(target, kernels="auto", retune=True).close()
    assert victim.read_text() == VICTIM_TEXT and (target / "plans.json").is_file()
    assert not [p for p in target.iterdir() if p.name.startswith(".plans.json.") and not p.is_symlink()]


def test_a_link_at_plans_json_is_neither_read_nor_replaced(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({"not": "a plan"}))
    (target / "plans.json").symlink_to(victim)
    done = cli("tune", str(target), env=_home(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (target / "plans.json").is_symlink() and json.loads(victim.read_text()) == {"not": "a plan"}
    assert (tmp_path / "home" / ".cache" / "edge-runtime" / "plans.json").is_file()  # it went to the user cache


def _hostile_plans(target: Path, tmp_path: Path, kind: str) -> None:
    path = target / "plans.json"
    if kind == "fifo":
        os.mkfifo(path)  # before: tune/check/run hung in save() reading it
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")  # before: 2.7 GB read
    else:
        with open(path, "wb") as handle:  # 4 GiB (sparse on disk): before, read whole
            handle.truncate(4 << 30)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_hostile_plans_json_never_hangs_or_fills_memory(tmp_path: Path, kind: str) -> None:
    import resource

    def limited() -> None:  # far less than the 4 GiB file or /dev/zero read whole
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    target = copy_model_dir("digits-mlp", tmp_path)
    env, x = _home(tmp_path), _input(tmp_path)
    for args in (["tune", str(target)], ["check", str(target)], ["run", str(target), "--input", str(x)],
                 ["bench", str(target), "--iters", "1", "--warmup", "0", "--min-seconds", "0"]):
        if (target / "plans.json").exists() or (target / "plans.json").is_symlink():
            (target / "plans.json").unlink()
        _hostile_plans(target, tmp_path, kind)
        done = cli(*args, env=env, timeout=120, preexec_fn=limited)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stderr)
    script = ("import sys; from edge_runtime import InferenceSession; "
              "InferenceSession(sys.argv[1], kernels='auto').close(); print('loaded')")
    (target / "plans.json").unlink()
    _hostile_plans(target, tmp_path, kind)
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, env=env,
                          timeout=120, preexec_fn=limited)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr


def test_read_plans_is_bounded_and_regular_only(tmp_path: Path) -> None:
    path = tmp_path / "plans.json"
    path.write_bytes(b" " * (plans.MAX_PLANS_BYTES + 1))
    assert plans.read_plans(path) == {}
    path.write_text(json.dumps({"k": {"engine": "ort", "layers": {}}}))
    assert plans.read_plans(path) == {"k": {"engine": "ort", "layers": {}}}
    (tmp_path / "link.json").symlink_to(path)
    assert plans.read_plans(tmp_path / "link.json") == {}


# -- write targets that are no file, and failures half way ---------------------------------------------
@pytest.mark.parametrize("where", [".", "/", ".."])
def test_outputs_that_name_a_folder_are_one_line(tmp_path: Path, where: str) -> None:
    x = _input(tmp_path)
    model = copy_model_dir("digits-mlp", tmp_path)
    for flag, needle in (("--output", "is a folder"), ("--out", ".npz")):  # before: ValueError traceback
        assert_one_line_error(cli("run", str(model), "--input", str(x), flag, where, "--kernels", "sparse"), needle)
    assert_one_line_error(cli("to-onnx", str(model), where, "--force"), "is a folder")
    assert not [p for p in Path(REPO).iterdir() if p.name.startswith("..") or ".tmp" in p.name]


def test_run_output_without_npy_suffix_writes_that_file_and_no_temp(tmp_path: Path) -> None:
    model = copy_model_dir("digits-mlp", tmp_path)
    out = tmp_path / "yout"
    done = cli("run", str(model), "--input", str(_input(tmp_path)), "--output", str(out), "--kernels", "sparse")
    assert done.returncode == 0, done.stderr  # before: "cannot write" and `.yout.PID.tmp.npy` left behind
    assert np.load(out).shape == (1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-mlp", "x.npy", "yout"]


def test_to_onnx_never_replaces_a_model_dir_file(tmp_path: Path) -> None:
    model = copy_model_dir("digits-mlp", tmp_path)
    other = copy_model_dir("digits-cnn", tmp_path)
    before = (model / "model.onnx").read_bytes()
    for out in (model / "model.onnx", model / "weights.npz", model / "manifest.json", other / "model.onnx"):
        assert_one_line_error(cli("to-onnx", str(model), str(out), "--force"), "MODEL_DIR")
    assert (model / "model.onnx").read_bytes() == before
    assert cli("check", str(model)).returncode == 0
    done = cli("to-onnx", str(model), str(model / "plain.onnx"))  # a file the manifest does not list is fine
    assert done.returncode == 0, done.stderr


def _full_disk(monkeypatch) -> None:
    """Every atomic write fails with ENOSPC after its temp file got bytes (what a full disk does)."""
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("edge_runtime.safe_io.os.fsync", no_space)


def test_a_full_disk_leaves_no_temp_file(tmp_path: Path, monkeypatch, capsys) -> None:
    model = copy_model_dir("digits-mlp", tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    x = _input(tmp_path)
    _full_disk(monkeypatch)
    assert main(["run", str(model), "--input", str(x), "--kernels", "sparse", "--out", str(tmp_path / "y.npz"),
                 "--output", str(tmp_path / "y.npy")]) == 2
    assert "No space left" in capsys.readouterr().err
    assert main(["to-onnx", str(model), str(tmp_path / "plain.onnx")]) == 2
    assert main(["tune", str(model)]) == 0  # the plan is only a cache: tuning still answers
    left = [p.name for p in [*tmp_path.iterdir(), *model.iterdir()] if p.name.startswith(".")]
    assert left == [] and not (tmp_path / "home" / ".cache" / "edge-runtime" / "plans.json").exists()


def test_a_read_only_folder_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    model = copy_model_dir("digits-mlp", tmp_path)
    x, out = _input(tmp_path), tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert_one_line_error(cli("run", str(model), "--input", str(x), "--output", str(out / "y.npy")),
                              "cannot write")
    finally:
        out.chmod(0o755)
    assert list(out.iterdir()) == []
