"""Checkpoints survive what disks do (issue 9, low): a flipped bit is refused, a full disk is one line
with the previous checkpoint intact, and a killed writer's temporary files are cleaned up. And
checkpoints keep the state_dict's module versions (issue 10)."""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor import checkpoints
from compressor.errors import CheckpointError
from compressor.train.models import build_model
from tests.compressor_fixtures import ENV, REPO, TINY_ARGS, run_tiny, tree_snapshot


def flip_a_tensor_bit(path: Path) -> None:
    """Flip one bit inside the first tensor's stored bytes (not the pickle, not a zip header)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 40] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_tensor_data_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_tiny(run_dir, target_sparsity=0.2)
    final = run_dir / "lr-rewind" / "level_1" / "final.pt"
    torch.load(final, weights_only=True)
    flip_a_tensor_bit(final)
    torch.load(final, weights_only=True)  # torch itself loads it silently: that is the bug
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        checkpoints.load(final)
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "export", str(run_dir), "--out", str(tmp_path / "md")],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "CRC-32" in proc.stderr and not (tmp_path / "md").exists()


def test_stale_temp_files_are_removed_on_resume_and_nothing_else(tmp_path):
    run_dir = tmp_path / "run"
    run_tiny(run_dir, target_sparsity=0.2)
    ours = [run_dir / ".metrics.json.k2j4h_9x.tmp", run_dir / "dense" / ".checkpoint.pt.ab12cd34.tmp",
            run_dir / "lr-rewind" / "level_1" / ".final.pt.zz99yy88.tmp"]
    theirs = [run_dir / "notes.tmp", run_dir / ".checkpoint.pt.tmp", run_dir / "dense" / ".my.pt.ab12cd34.tmp"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".final.pt.ab12cd34.tmp").write_bytes(b"x")
    (run_dir / "linked").symlink_to(elsewhere)  # never followed
    for path in ours + theirs:
        path.write_bytes(b"half a checkpoint")
    run_tiny(run_dir, target_sparsity=0.2, resume=True)
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in theirs) and (elsewhere / ".final.pt.ab12cd34.tmp").exists()


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoints.atomic_save({"epoch": 1, "w": torch.ones(10)}, path)
    before = path.read_bytes()
    code = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from compressor import checkpoints\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    checkpoints.atomic_save({'epoch': 2, 'w': torch.ones(100_000)}, Path(sys.argv[1]))\n"
        "except checkpoints.CheckpointError as error:\n"
        "    print(error)\n"
        "try:\n"
        "    checkpoints.atomic_write_text('x' * 10_000, Path(sys.argv[1]).with_name('metrics.json'))\n"
        "except checkpoints.CheckpointError as error:\n"
        "    print(error)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("cannot write") == 2, proc.stderr
    assert "checkpoint.pt: File too large" in proc.stdout and "metrics.json: File too large" in proc.stdout
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def _limit_file_size():
    # A real kernel refusal (EFBIG, what ENOSPC looks like to the writer) once a file passes the limit.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


LIMIT = 130_000  # above a --pretrained dense final.pt (no optimizer state), below a training checkpoint


@pytest.mark.slow
def test_disk_full_during_compress_is_one_line_exit_2_and_resume_finishes(tmp_path):
    pretrained = tmp_path / "dense.pt"
    torch.manual_seed(0)
    torch.save(build_model("digits-mlp").state_dict(), pretrained)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "edgeprune", "compress", "--model", "digits-mlp", "--pretrained", str(pretrained),
            *TINY_ARGS, "--out", str(run_dir)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot write" in proc.stderr
    assert "level_1/checkpoint.pt" in proc.stderr
    assert os.path.getsize(run_dir / "dense" / "final.pt") < LIMIT
    checkpoints.load(run_dir / "dense" / "final.pt")  # the finished level is intact
    assert not list(run_dir.rglob("*.tmp"))
    done = tree_snapshot(run_dir)
    proc = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert tree_snapshot(run_dir)["dense/final.pt"] == done["dense/final.pt"]
    assert (run_dir / "lr-rewind" / "level_4" / "final.pt").is_file()


class Versioned(nn.Module):
    """A module whose saved format changed (like torchvision's MNASNet): it refuses weights that do
    not say which version wrote them."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"{prefix or 'model'}: weights of an unknown format version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class VersionedNet(nn.Module):
    input_shape = (64,)

    def __init__(self) -> None:
        super().__init__()
        self.body = Versioned()
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.body(x))


def test_checkpoints_keep_module_versions_through_every_level(tmp_path):
    from compressor.config import PruneConfig
    from compressor.train.data import load_data
    from compressor.pipeline import compress
    from compressor.run.run_dir import load_level

    torch.manual_seed(0)
    model = VersionedNet()
    with pytest.raises(ValueError, match="unknown format version"):  # what a plain dict copy used to do
        VersionedNet().load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    config = PruneConfig(epochs=1, lr_drops=(), target_sparsity=0.45, seed=0)
    train, test = load_data("digits", (64,), 64, 0)
    result = compress(model, train, test, config, out=tmp_path / "run", device="cpu")
    assert [e["level"] for e in result.metrics["methods"]["lr-rewind"]] == [0, 1, 2, 3]
    saved = checkpoints.load(tmp_path / "run" / "lr-rewind" / "level_3" / "final.pt")["model"]
    assert saved._metadata["body"]["version"] == 2 and saved._metadata["bn"]["version"] == 2
    assert load_level(tmp_path / "run", model=VersionedNet()).level == 3

