"""`edgeprune bench` over SSH with hostile inputs and a device that hangs (issue 9, low items):

- only the files a MODEL_DIR's manifest lists are uploaded, and only as regular files inside the
  folder (before: every file under it, symlinks followed);
- a configuration on a device that stops answering is recorded as "timeout" (before: "failed"),
  and the sweep reconnects and goes on.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from benchmarks.sweep_plan import read_model_dir
from benchmarks.targets import model_content_id
from tests.bench_fixtures import (FAST, bench_cli, bench_device_root, bench_models, kill_leftovers,  # noqa: F401
                                  processes_matching, read_results, ssh_args, wait_for)
from tests.sshd import _children, sshd, sshd_factory  # noqa: F401

pytestmark = pytest.mark.sshd


def _fresh_copy(source: Path, folder: Path, root: Path) -> Path:
    """A copy of a MODEL_DIR whose scratch copy on the device is removed, so the bench uploads it."""
    copy = Path(shutil.copytree(source, folder))
    shutil.rmtree(root / "scratch" / f"model-{model_content_id(read_model_dir(copy))}", ignore_errors=True)
    return copy


def test_only_listed_regular_files_are_uploaded(bench_cli, bench_models, bench_device_root, sshd, tmp_path):
    model = _fresh_copy(bench_models["sparse90"], tmp_path / "with-extras", bench_device_root)
    (model / "notes.txt").write_text("not in the manifest")
    (model / "private").mkdir()
    (model / "private" / "key").write_text("secret")
    code, _, err = bench_cli(sshd.spec, model, "--kernels", "ort", *FAST, "--out", tmp_path / "out",
                             *ssh_args(sshd, bench_device_root))
    assert code == 0, err
    record = read_results(tmp_path / "out")["results"][0]
    uploaded = Path(record["bench"]["model"]["path"])
    listed = set(read_model_dir(model).files) | {"manifest.json"}
    assert {str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file()} == listed

    # A listed file that is a symlink (here to a copy outside the folder, hashes intact) is not sent.
    linked = _fresh_copy(bench_models["sparse90"], tmp_path / "linked", bench_device_root)
    outside = tmp_path / "outside-weights.npz"
    shutil.move(linked / "weights.npz", outside)
    (linked / "weights.npz").symlink_to(outside)
    code, _, err = bench_cli(sshd.spec, linked, "--kernels", "ort", *FAST, "--out", tmp_path / "out2",
                             *ssh_args(sshd, bench_device_root))
    assert code == 1, err
    record = read_results(tmp_path / "out2")["results"][0]
    assert record["status"] == "failed" and "symlink" in record["error"], record
    scratch = bench_device_root / "scratch" / f"model-{model_content_id(read_model_dir(linked))}"
    assert not scratch.exists()  # a half upload is never left to be used


@pytest.mark.slow
def test_a_configuration_on_a_device_that_stops_answering_is_a_timeout(bench_cli, bench_models, bench_device_root,
                                                                        sshd, tmp_path):
    running = lambda: processes_matching(f"edge_runtime bench {bench_device_root}",  # noqa: E731
                                         exclude="bench_supervisor")
    frozen: list = []

    def freeze_when_running() -> None:
        wait_for(running, 60, "the remote benchmark to start")
        sessions = _children(sshd.process.pid)
        frozen.extend(sessions + [pid for parent in sessions for pid in _children(parent)
                                  if "sshd" in Path(f"/proc/{pid}/comm").read_text()])
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)  # the device stops answering; new connections still work

    freezer = threading.Thread(target=freeze_when_running)
    freezer.start()
    try:
        code, _, err = bench_cli(sshd.spec, bench_models["dense"], "--kernels", "ort", "--min-seconds", "600",
                                 "--out", tmp_path / "out", "--timeout", "2", *ssh_args(sshd, bench_device_root))
        freezer.join()
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    try:
        wait_for(lambda: not running(), 20, "the orphaned remote benchmark to be killed")
    finally:
        kill_leftovers(f"edge_runtime bench {bench_device_root}")
    assert code == 1, err
    data = read_results(tmp_path / "out")
    record = data["results"][0]
    assert record["status"] == "timeout" and "did not answer" in record["error"], record
    assert data["hosts"][sshd.spec].get("facts_after")  # reconnected and went on
