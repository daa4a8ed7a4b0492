"""``edgeprune compress`` under torchrun: 2 CPU processes (gloo) on the tiny digits run.

One run crosses process counts on purpose: 2 processes killed (SIGKILL, launcher and workers) after
level 1, resumed by 1 process killed after level 2, finished by 2 processes again.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from compressor.run.run_dir import LOCK
from compressor.train.distributed import DistributedError, current, tensors_sha256
from tests.compressor_fixtures import TEMP_ROOT, final, run_tiny
from tests.distributed_fixtures import kill_when, launch, run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~20 s: torchrun runs killed and resumed

LEVELS = 4  # densities 0.8, 0.64, 0.512, then the 0.45 target (sparsity 0.55)


def test_killed_and_resumed_across_process_counts():
    out = TEMP_ROOT / "torchrun"
    kill_when(launch(out, nproc=2), out / "lr-rewind" / "level_1" / "final.pt")
    assert not (out / "lr-rewind" / f"level_{LEVELS}" / "final.pt").exists()
    kill_when(launch(out, nproc=1, resume=True), out / "lr-rewind" / "level_2" / "final.pt")
    done = run(out, nproc=2, resume=True)
    assert done.returncode == 0, done.stderr

    # Only rank 0 prints: the result table appears once.
    assert done.stdout.count("results:") == 1 and done.stdout.count("lr-rewind ") == LEVELS + 1, done.stdout
    # Only rank 0 writes, atomically: no temp files left by anyone, a complete metrics.json.
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != LOCK]  # the lock stays, unheld
    assert not list(out.rglob("checkpoint.pt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["level"] for e in metrics["methods"]["lr-rewind"]] == list(range(LEVELS + 1))
    assert (out / "report.md").is_file() and (out / "sparsity_accuracy.png").is_file()

    worlds = []
    for level in range(LEVELS + 1):
        saved = final(out, "lr-rewind", level)
        worlds.append(saved["world_size"])
        # Every rank's mask checksum was gathered by rank 0: one per rank, all equal to the saved mask's.
        assert saved["mask_sha256"] == [tensors_sha256(saved["mask"])] * saved["world_size"], level
    assert worlds[0] == 2 and worlds[-1] == 2 and 1 in worlds  # level 2 (at least) ran on 1 process

    # The global batch is the same at any process count: results match a single-process run up to
    # float summation order (digits-mlp has no BatchNorm, so nothing else differs).
    single = run_tiny(TEMP_ROOT / "torchrun-single").metrics["methods"]["lr-rewind"]
    for ours, reference in zip(metrics["methods"]["lr-rewind"], single):
        assert ours["sparsity"] == pytest.approx(reference["sparsity"], abs=1e-6)
        assert ours["accuracy"] == pytest.approx(reference["accuracy"], abs=0.03)


def _disagree(rank: int, store_path: str, outcome: str) -> None:
    """One of two gloo ranks; rank 1 holds a different mask."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        context = current(torch.device("cpu"))
        context.agree("mask", {"w": torch.tensor([True, rank == 0])})
    except DistributedError as error:
        with open(f"{outcome}.{rank}", "w") as handle:
            handle.write(str(error))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_with_different_masks_are_caught():
    with tempfile.TemporaryDirectory(dir=TEMP_ROOT) as folder:
        outcome = os.path.join(folder, "outcome")
        mp.spawn(_disagree, args=(os.path.join(folder, "store"), outcome), nprocs=2, join=True)
        for rank in (0, 1):  # every rank stops, not just rank 0
            with open(f"{outcome}.{rank}") as handle:
                assert "ranks [1] differ from rank 0" in handle.read()
