"""Training with masks, learning-rate schedules and what each retraining method starts from."""

from __future__ import annotations

import pytest
import torch

import compressor.pipeline
from compressor.config import PruneConfig
from compressor.train.data import digits
from compressor.prune.mask import Mask
from compressor.train.models import build_model
from compressor.train.optimizers import build_optimizer
from compressor.prune.weights import global_magnitude_prune, prunable_parameters
from compressor.train.schedules import final_learning_rate, learning_rate
from compressor.train.training import train_epoch
from tests.compressor_fixtures import TEMP_ROOT, final, one_thread, run_tiny, shared_run


def test_pruned_weights_stay_exactly_zero_under_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = build_model("digits-mlp")
    config = PruneConfig(lr=0.5, momentum=0.9, weight_decay=0.05)
    optimizer = build_optimizer(model, config)
    train_loader, _ = digits((64,), batch_size=32, seed=0)
    params = prunable_parameters(model)
    everything = Mask.ones_like(params)
    with one_thread():
        # One dense epoch first, so every momentum buffer is non-zero when pruning happens.
        train_epoch(model, optimizer, train_loader, lambda t: 0.5, 0, params, everything, torch.device("cpu"))
        mask = global_magnitude_prune(params, everything, everything.total // 5)
        for epoch in range(2):
            train_epoch(model, optimizer, train_loader, lambda t: 0.5, epoch, params, mask, torch.device("cpu"))
    for name, keep in mask.items():
        assert bool((params[name][~keep] == 0).all()), name
        assert bool((optimizer.state[params[name]]["momentum_buffer"][~keep] == 0).all()), name
        assert bool((params[name][keep] != 0).all()), name  # the survivors did train


def test_schedule_step_warmup_cosine_and_final_lr():
    step = PruneConfig(epochs=10, lr=0.1, lr_drops=(5, 8), gamma=0.1)
    assert [learning_rate(step, e) for e in (0, 4.9, 5, 7.5, 8, 9.99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert final_learning_rate(step, steps_per_epoch=10) == pytest.approx(0.001)
    warm = PruneConfig(epochs=10, lr=0.2, warmup_epochs=2)
    assert learning_rate(warm, 1.0) == pytest.approx(0.1) and learning_rate(warm, 2.0) == pytest.approx(0.2)
    cosine = PruneConfig(epochs=10, lr=0.1, schedule="cosine")
    assert learning_rate(cosine, 0) == pytest.approx(0.1) and learning_rate(cosine, 5) == pytest.approx(0.05)
    assert learning_rate(cosine, 10) == pytest.approx(0.0, abs=1e-12)


def test_lr_rewind_replays_the_schedule_and_finetune_stays_at_the_final_lr():
    run = shared_run()
    dense = final(run, "dense", 0)["lrs"]
    assert dense == pytest.approx([0.1, 0.1, 0.01])  # 3 epochs, drop at epoch 2
    for level in range(1, 5):
        assert final(run, "lr-rewind", level)["lrs"] == pytest.approx(dense)
        assert final(run, "finetune", level)["lrs"] == pytest.approx([0.01, 0.01, 0.01])
        assert final(run, "weight-rewind", level)["lrs"] == pytest.approx(dense[1:])  # from rewind epoch 1
        assert final(run, "weight-rewind", level)["epochs"] == 2


def test_each_method_starts_retraining_from_the_right_weights(monkeypatch):
    starts = []
    real_train = compressor.pipeline.train

    def recording_train(model, optimizer, loader, lr_at, epochs, params, mask, *args, **kwargs):
        starts.append((epochs.start, {n: p.detach().clone() for n, p in model.state_dict().items()},
                       {n: m.clone() for n, m in mask.items()}))
        return real_train(model, optimizer, loader, lr_at, epochs, params, mask, *args, **kwargs)

    monkeypatch.setattr(compressor.pipeline, "train", recording_train)
    out = TEMP_ROOT / "starts"
    run_tiny(out, methods=("weight-rewind", "lr-rewind"), target_sparsity=0.2)  # one level per method
    assert len(starts) == 3  # dense, weight-rewind level 1, lr-rewind level 1
    rewind = torch.load(out / "dense" / "rewind.pt", weights_only=True)["model"]
    dense = final(out, "dense", 0)["model"]
    for (start, state, mask), source in ((starts[1], rewind), (starts[2], dense)):
        for name, tensor in state.items():
            expected = source[name] * mask[name] if name in mask else source[name]
            assert torch.equal(tensor, expected), name
    assert starts[1][0] == 1 and starts[2][0] == 0  # weight-rewind resumes the schedule at its epoch
    assert not torch.equal(rewind["net.0.weight"], dense["net.0.weight"])
