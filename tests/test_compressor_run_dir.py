"""Reading runs back: list_levels, load_level and load_state_dict (what export depends on)."""

from __future__ import annotations

import pytest
import torch

from compressor.checkpoints import load_state_dict
from compressor.train.data import digits
from compressor.errors import CheckpointError, RunDirError
from compressor.train.models import build_model
from compressor.run.run_dir import list_levels, load_level
from compressor.train.training import evaluate
from tests.compressor_fixtures import shared_run


def test_list_levels_reports_every_finished_level():
    levels = list_levels(shared_run())
    assert [(i.method, i.level) for i in levels[:5]] == [("lr-rewind", k) for k in range(5)]
    assert len(levels) == 15 and all(i.path.is_file() for i in levels)
    assert levels[0].path.parent.name == "dense"


def test_load_level_defaults_to_first_method_last_level_and_reproduces_its_accuracy():
    loaded = load_level(shared_run())
    assert (loaded.method, loaded.level, loaded.model_name) == ("lr-rewind", 4, "digits-mlp")
    assert loaded.input_shape == (64,) and not loaded.model.training
    assert loaded.sparsity == pytest.approx(0.55, abs=1e-3)
    _, test_loader = digits(loaded.input_shape, 64, 0)
    accuracy, _ = evaluate(loaded.model, test_loader, torch.device("cpu"))
    assert accuracy == loaded.accuracy
    other = load_level(shared_run(), method="weight-rewind", level=2)
    assert (other.method, other.level) == ("weight-rewind", 2)
    assert load_level(shared_run(), method="finetune", level=0).sparsity == 0.0


def test_load_level_errors_are_typed(tmp_path):
    with pytest.raises(RunDirError, match="no method 'pruning'"):
        load_level(shared_run(), method="pruning")
    with pytest.raises(RunDirError, match="no finished level 9"):
        load_level(shared_run(), level=9)
    with pytest.raises(RunDirError, match="not found"):
        list_levels(tmp_path / "absent")
    (tmp_path / "metrics.json").write_text("{ truncated")
    with pytest.raises(RunDirError, match="not valid JSON"):
        list_levels(tmp_path)


def test_load_state_dict_reads_plain_and_edgeprune_checkpoints_and_rejects_others(tmp_path):
    from_final = load_state_dict(shared_run() / "lr-rewind" / "level_1" / "final.pt")
    plain = tmp_path / "plain.pt"
    torch.save(from_final, plain)
    assert all(torch.equal(from_final[k], v) for k, v in load_state_dict(plain).items())
    build_model("digits-mlp").load_state_dict(from_final)
    (tmp_path / "cut.pt").write_bytes(plain.read_bytes()[:-100])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "dict.pt")
    for name in ("cut.pt", "tensor.pt", "dict.pt", "missing.pt"):
        with pytest.raises(CheckpointError):
            load_state_dict(tmp_path / name)
