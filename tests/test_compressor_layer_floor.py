"""No layer is pruned away by accident (issue 10): a per-layer floor in global magnitude pruning,
shown in report.md, and a warning line when a layer falls below a few percent density."""

from __future__ import annotations

import random

import pytest
import torch

from compressor.config import PruneConfig
from compressor.errors import ConfigError
from compressor.prune.mask import Mask
from compressor.train.models import build_model
from compressor.prune.weights import global_magnitude_prune, layer_minimums, prunable_parameters
from tests.compressor_fixtures import cli


def small_last_layer():
    torch.manual_seed(0)
    params = prunable_parameters(build_model("digits-mlp"))
    with torch.no_grad():  # a layer whose weights are all smaller than any other layer's
        params["net.4.weight"].mul_(1e-4)
    return params


def test_pure_global_pruning_can_empty_a_layer_and_the_floor_prevents_it():
    params = small_last_layer()
    mask = Mask.ones_like(params)
    keep = mask.total // 10  # 90% sparsity
    bare = global_magnitude_prune(params, mask, keep, floor=0.0)
    assert int(bare["net.4.weight"].sum()) == 0  # the classifier is gone: every output is its bias
    floored = global_magnitude_prune(params, mask, keep, floor=0.1)
    assert floored.kept == keep  # the count stays exact
    n = params["net.4.weight"].numel()
    assert int(floored["net.4.weight"].sum()) == 1 + int(0.1 * (keep - 3) * n / mask.total)
    kept = params["net.4.weight"].abs()[floored["net.4.weight"]]
    assert kept.min() >= params["net.4.weight"].abs()[~floored["net.4.weight"]].max()  # its largest ones


def test_the_floor_never_asks_for_more_than_keep_and_never_revives_a_weight():
    rng = random.Random(0)
    for _ in range(2000):
        sizes = {f"l{i}": rng.randint(1, 5000) for i in range(rng.randint(1, 8))}
        survivors = {name: rng.randint(1, size) for name, size in sizes.items()}
        keep = rng.randint(len(sizes), max(len(sizes), sum(survivors.values()) // rng.choice([1, 50])))
        minimums = layer_minimums(sizes, survivors, keep, rng.choice([0.01, 0.1, 0.5, 1.0]))
        assert sum(minimums.values()) <= keep
        assert all(1 <= minimums[n] <= survivors[n] for n in sizes)
    with pytest.raises(ConfigError, match="layer floor"):
        PruneConfig(layer_floor=1.5)


def test_a_sparse_run_warns_about_thin_layers_and_reports_the_floor(tmp_path):
    run = tmp_path / "run"
    code, out, err = cli(["compress", "--model", "digits-mlp", "--epochs", "2", "--lr-drops", "none",
                          "--target-sparsity", "0.99", "--one-shot", "--no-progress", "--out", str(run)])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings and all("lr-rewind level 1: layer" in line and "--layer-floor" in line for line in warnings)
    assert len({line.split("layer ")[1].split()[0] for line in warnings}) == len(warnings)  # once per layer
    from compressor.checkpoints import load

    final = load(run / "lr-rewind" / "level_1" / "final.pt")
    assert all(sparsity < 1.0 for sparsity in final["layers"].values())  # no layer emptied at 99%
    report = (run / "report.md").read_text()
    assert "Per-layer floor" in report and "0.1 × the overall density" in report and "⚠" in report
    assert all(name in report for name in final["layers"])
