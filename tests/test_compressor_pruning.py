"""Global magnitude pruning, the Mask type, and the density schedule (0.8^k, then the exact target)."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import CheckpointError, ConfigError
from compressor.prune.mask import Mask
from compressor.train.models import build_model
from compressor.prune.weights import (global_magnitude_prune, keep_counts, layer_sparsities, prunable_parameters,
                                weight_sparsity)
from tests.compressor_fixtures import final, shared_run


def test_threshold_is_global_not_per_layer():
    torch.manual_seed(0)
    model = build_model("digits-mlp")
    params = prunable_parameters(model)
    with torch.no_grad():  # give the layers clearly different magnitude scales
        params["net.0.weight"].mul_(10.0)
        params["net.4.weight"].mul_(0.1)
    mask = Mask.ones_like(params)
    keep = mask.total // 2
    new = global_magnitude_prune(params, mask, keep)
    assert new.kept == keep  # exact, not approximately
    kept = torch.cat([params[n].abs()[new[n]] for n in new])
    pruned = torch.cat([params[n].abs()[~new[n]] for n in new])
    assert pruned.max() <= kept.min()  # one threshold across all layers
    per_layer = {n: 1 - float(new[n].float().mean()) for n in new}
    assert per_layer["net.0.weight"] < 0.2 and per_layer["net.4.weight"] > 0.9


def test_pruned_weights_stay_pruned_in_later_rounds():
    torch.manual_seed(1)
    params = prunable_parameters(build_model("digits-mlp"))
    first = global_magnitude_prune(params, Mask.ones_like(params), 12000)
    with torch.no_grad():  # a pruned weight that grew back in value must not be revived by the next round
        name = next(iter(first))
        flat = params[name].view(-1)
        dead = (~first[name]).view(-1).nonzero()[0]
        flat[dead] = 1e6
    second = global_magnitude_prune(params, first, 9000)
    assert second.kept == 9000
    assert not bool(second[name].view(-1)[dead])
    assert all(bool((second[n] <= first[n]).all()) for n in first)


def test_only_conv_and_linear_weights_are_prunable_and_exclude_keeps_layers_dense():
    model = build_model("digits-cnn")
    names = set(prunable_parameters(model))
    assert names == {"features.0.weight", "features.3.weight", "features.7.weight", "fc.weight"}
    assert set(prunable_parameters(model, exclude=("fc", "features.0"))) == {"features.3.weight",
                                                                          "features.7.weight"}
    with pytest.raises(ConfigError, match="no prunable layer named 'fcc'"):
        prunable_parameters(model, exclude=("fcc",))


def test_keep_counts_follow_powers_of_0_8_and_end_exactly_at_the_target():
    counts = keep_counts(10_000, 0.2, 0.9, one_shot=False)
    # 0.8^10 = 10.7% density is a sliver from 10%: that round goes straight to the target.
    assert counts[:-1] == [round(10_000 * 0.8 ** k) for k in range(1, 10)]
    assert counts[-1] == 1_000 and len(counts) == 10
    assert len(keep_counts(10_000, 0.2, 0.95, one_shot=False)) == 13   # 0.8^13 = 5.5% folds into 5%
    # A last step that is not a sliver keeps its own round: 51.2% → 45% density removes 12%.
    assert keep_counts(10_000, 0.2, 0.55, one_shot=False) == [8000, 6400, 5120, 4500]
    assert keep_counts(10_000, 0.2, 0.5, one_shot=False) == [8000, 6400, 5000]  # 51.2% → 50% folded
    assert keep_counts(10_000, 0.2, 0.36, one_shot=False) == [8000, 6400]  # target is itself 0.8^2
    assert keep_counts(10_000, 0.2, 0.9, one_shot=True) == [1000]
    with pytest.raises(ConfigError):
        keep_counts(3, 0.2, 0.9, one_shot=False)


def test_mask_validates_itself_and_knows_its_sparsity():
    mask = Mask({"a": torch.tensor([1, 0, 1, 0]), "b": torch.ones(2, 2, dtype=torch.bool)})
    assert mask["a"].dtype == torch.bool and mask.total == 8 and mask.kept == 6
    assert mask.sparsity == pytest.approx(0.25)
    with pytest.raises(CheckpointError):
        Mask({"a": torch.tensor([0.5, 1.0])})
    with pytest.raises(CheckpointError):
        Mask({"": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match="shape"):
        Mask({"net.0.weight": torch.ones(3, dtype=torch.bool)}).check_fits(build_model("digits-mlp"))


def test_run_levels_hit_the_densities_and_the_target_from_the_actual_weights():
    run = shared_run()
    model = build_model("digits-mlp")
    total = sum(p.numel() for p in prunable_parameters(model).values())
    for method in ("lr-rewind", "finetune", "weight-rewind"):
        expected = keep_counts(total, 0.2, 0.55, one_shot=False)
        assert len(expected) == 4  # 0.8, 0.64, 0.512, then 0.45
        for level, keep in enumerate(expected, start=1):
            saved = final(run, method, level)
            weights = {n: saved["model"][n] for n in saved["mask"]}
            zeros = sum(int((w == 0).sum()) for w in weights.values())
            assert zeros == total - keep, (method, level)  # counted from the weights, not the mask
            assert saved["sparsity"] == pytest.approx(weight_sparsity(weights))
            assert all(bool((weights[n][~saved["mask"][n]] == 0).all()) for n in weights)
        assert abs(final(run, method, 4)["sparsity"] - 0.55) <= 1.0 / total
        layers = layer_sparsities({n: final(run, method, 4)["model"][n] for n in saved["mask"]})
        assert len({round(v, 3) for v in layers.values()}) > 1  # global pruning: layers differ
