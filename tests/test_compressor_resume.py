"""Durable runs: a killed run resumed ends exactly like an uninterrupted one; RUN_DIRs are never damaged."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from compressor.errors import RunDirError
from edgeprune.cli import main
from tests.compressor_fixtures import (TEMP_ROOT, TINY, cli, compress_killed_at, final, run_tiny, shared_run,
                                      strip_seconds, tree_snapshot)

METHODS = ("lr-rewind", "finetune", "weight-rewind")


class Interrupted(Exception):
    pass


def _same_run(a, b):
    """Equal metrics (wall times aside) and bit-identical weights at every level."""
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert strip_seconds(ma) == strip_seconds(mb)
    for method in METHODS:
        for level in range(0, 5):
            sa, sb = final(a, method, level), final(b, method, level)
            assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]), (method, level)


def test_interrupted_runs_resume_to_the_same_result():
    out = TEMP_ROOT / "interrupted"
    # Stop in the middle of the dense training, of a weight-rewind level and of a finetune level.
    for stop_at in (("dense", 0, 1), ("finetune", 3, 0), ("weight-rewind", 2, 1)):
        def stop(method, level, epoch, stop_at=stop_at):
            if (method, level, epoch) == stop_at:
                raise Interrupted
        with pytest.raises(Interrupted):
            run_tiny(out, resume=out.exists(), methods=METHODS, epoch_callback=stop)
    assert (out / "weight-rewind" / "level_2" / "checkpoint.pt").is_file()
    result = run_tiny(out, resume=True, methods=METHODS)
    assert not list(out.rglob("checkpoint.pt"))  # finished levels drop their epoch checkpoints
    _same_run(out, shared_run())
    assert result.final("lr-rewind")["level"] == 4


def test_sigkilled_cli_run_resumes_to_the_same_result():
    out = TEMP_ROOT / "killed"
    # A real process killed with SIGKILL right after an epoch checkpoint of lr-rewind level 2.
    args = ["--out", str(out), "--method", ",".join(METHODS), "--epochs", str(TINY["epochs"]),
            "--lr-drops", "2", "--target-sparsity", "0.55", "--rewind-epoch", "1", "--seed", "3", "--no-progress"]
    proc = compress_killed_at(args, "lr-rewind", 2, 1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "lr-rewind" / "level_2" / "checkpoint.pt").is_file()
    code, stdout, stderr = cli(["compress", *args, "--resume"])
    assert code == 0, stderr
    assert "weight-rewind" in stdout
    _same_run(out, shared_run())


def test_resume_with_another_config_is_refused_and_changes_nothing(capsys):
    run = shared_run()
    before = tree_snapshot(run)
    code = main(["compress", "--out", str(run), "--resume", "--method", ",".join(METHODS), "--epochs", "4",
                 "--lr-drops", "2", "--target-sparsity", "0.55", "--rewind-epoch", "1", "--seed", "3"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "different config" in stderr and "epochs: 3 -> 4" in stderr
    assert tree_snapshot(run) == before


def test_new_run_into_a_non_empty_run_dir_is_refused():
    run = shared_run()
    before = tree_snapshot(run)
    with pytest.raises(RunDirError, match="--resume"):
        run_tiny(run, methods=METHODS)
    assert tree_snapshot(run) == before
