"""What a RUN_DIR's files look like to the user: modes that follow the umask, no dead weight in final.pt."""

from __future__ import annotations

import os
import stat

from compressor import checkpoints
from tests.compressor_fixtures import final, shared_run


def test_atomic_writes_follow_the_umask_like_open_does(tmp_path):
    previous = os.umask(0o027)
    try:
        checkpoints.atomic_write_text("x", tmp_path / "report.md")
        checkpoints.atomic_save({"a": 1}, tmp_path / "final.pt")
    finally:
        os.umask(previous)
    for name in ("report.md", "final.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_final_checkpoints_carry_no_optimizer_state():
    run = shared_run()
    saved = final(run, "lr-rewind", 1)
    assert "optimizer" not in saved and saved["model"]  # resuming needs it only in the epoch checkpoint
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((run / "metrics.json").stat().st_mode) == 0o666 & ~umask
