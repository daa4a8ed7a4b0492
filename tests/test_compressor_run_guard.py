"""A RUN_DIR is the user's work: one writer at a time, and export's --force never deletes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from compressor.errors import RunDirError
from compressor.run.run_dir import LOCK, RunDir
from tests.compressor_fixtures import cli, run_tiny, shared_run, tree_snapshot


def _copy_of_shared_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(shared_run(), run)
    return run


def test_a_second_resume_of_a_held_run_is_refused_with_who_holds_it(tmp_path: Path) -> None:
    run = _copy_of_shared_run(tmp_path)
    before = tree_snapshot(run)
    with RunDir(run).hold():  # as a first `compress --resume` holds it while it trains
        with pytest.raises(RunDirError, match=r"is being written by pid \d+ on .* since"):
            run_tiny(run, resume=True, methods=("lr-rewind", "finetune", "weight-rewind"))
    after = tree_snapshot(run)
    after.pop(LOCK, None)
    assert after == {k: v for k, v in before.items() if k != LOCK}  # nothing retrained, nothing removed


def test_the_lock_is_free_again_once_its_holder_is_done(tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    with RunDir(run).hold():
        pass
    with RunDir(run).hold():  # no stale lock: flock dies with the descriptor
        assert (run / LOCK).read_text().startswith("pid ")


def test_export_force_replaces_only_a_model_dir(tmp_path: Path) -> None:
    run = _copy_of_shared_run(tmp_path)
    before = tree_snapshot(run)
    for out in (run, run / "lr-rewind", run / "dense"):
        code, _, err = cli(["export", str(run), "--out", str(out), "--force"])
        assert code == 2 and "not a MODEL_DIR" in err and len(err.strip().splitlines()) == 1, err
    assert tree_snapshot(run) == before
    model_dir = tmp_path / "m"
    assert cli(["export", str(run), "--out", str(model_dir)])[0] == 0
    code, _, err = cli(["export", str(run), "--out", str(model_dir), "--force"])  # a MODEL_DIR: replaced
    assert code == 0, err
