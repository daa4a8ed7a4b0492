"""A diverging run stops with one line naming what diverged and when (issue 9), keeps every
finished level, and metrics.json stays strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compressor import checkpoints
from tests.compressor_fixtures import TINY_ARGS, cli

# A user's data whose training batches turn to NaN from the 4th pass on: the dense level (3 epochs)
# trains normally, the first pruned level meets bad data in its first epoch.
BAD_DATA = '''
from compressor.train.data import digits


class GoesBad:
    def __init__(self, loader):
        self.loader, self.passes = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for inputs, labels in self.loader:
            # pass 1 is the up-front probe of one batch, passes 2-4 the dense epochs, pass 5 level 1
            yield (inputs * float("nan") if self.passes >= 5 else inputs), labels


def loaders():
    train, test = digits((64,), 64, 3)
    return GoesBad(train), test
'''


def strict_json(path: Path):
    """json.loads that refuses NaN/Infinity, as strict parsers in other languages do."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_huge_learning_rate_stops_with_one_line_and_exit_2(tmp_path):
    code, out, err = cli(["compress", "--model", "digits-mlp", *TINY_ARGS, "--lr", "10000", "--out", str(tmp_path / "run")])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "dense diverged" in err and "epoch 1" in err and "--lr" in err
    assert not (tmp_path / "run" / "dense" / "final.pt").exists()  # no NaN level is ever saved as done
    assert "0.00%" not in out


def test_divergence_at_a_later_level_keeps_the_finished_ones(tmp_path):
    (tmp_path / "bad_data.py").write_text(BAD_DATA)
    run = tmp_path / "run"
    code, out, err = cli(["compress", "--model", "digits-mlp", "--data", f"{tmp_path / 'bad_data.py'}:loaders",
                          *TINY_ARGS, "--out", str(run)])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "lr-rewind level 1 diverged" in err and "in epoch 1" in err
    dense = checkpoints.load(run / "dense" / "final.pt")
    assert all(bool(torch.isfinite(t).all()) for t in dense["model"].values() if t.is_floating_point())
    metrics = strict_json(run / "metrics.json")
    assert [e["level"] for e in metrics["methods"]["lr-rewind"]] == [0]
    assert metrics["methods"]["lr-rewind"][0]["accuracy"] > 0.5
    assert not (run / "lr-rewind" / "level_1" / "final.pt").exists()
    assert not list(run.rglob("*.tmp"))


def test_metrics_json_is_strict_even_for_a_level_saved_with_a_nan_loss(tmp_path):
    """A level written by an older version from a diverged run: its NaN becomes null, not NaN."""
    from compressor.run.report import markdown_table, write_metrics
    from compressor.run.run_dir import RunDir, collect_metrics
    from tests.compressor_fixtures import run_tiny

    run_dir = tmp_path / "run"
    run_tiny(run_dir, target_sparsity=0.2)
    path = run_dir / "lr-rewind" / "level_1" / "final.pt"
    final = checkpoints.load(path)
    final["loss"] = float("nan")
    checkpoints.atomic_save(final, path)
    metrics = collect_metrics(RunDir(run_dir))
    write_metrics(RunDir(run_dir), metrics)
    assert strict_json(run_dir / "metrics.json")["methods"]["lr-rewind"][1]["loss"] is None
    assert "| – |" in markdown_table(metrics)
