"""``compressor.train.batches``: how a batch feeds a model, which output the loss sees, what the loss is."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from compressor.train.batches import Task, call_model, named_inputs, pick_output, split_batch
from compressor.errors import ConfigError


def test_pick_output_follows_what_the_model_returns() -> None:
    a, b = torch.zeros(2, 3), torch.ones(2, 5)
    assert pick_output(a)[0] == "output"
    assert pick_output((a, b)) == ("output_0", a) and pick_output((a, b), "1")[1] is b
    assert pick_output({"hidden": a, "logits": b})[1] is b  # logits wins over the first entry
    ordered = OrderedDict(loss=None, hidden=a)  # a ModelOutput is an OrderedDict; None entries skipped
    assert pick_output(ordered) == ("hidden", a)
    with pytest.raises(ConfigError, match="no output 'x'; its outputs: hidden, logits"):
        pick_output({"hidden": a, "logits": b}, "x")
    with pytest.raises(ConfigError, match="not a tensor"):
        pick_output("text")


def test_inputs_are_named_and_ordered_as_the_forward_takes_them() -> None:
    class Two(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids * attention_mask

    ids, mask = torch.ones(2, 4), torch.zeros(2, 4)
    assert list(named_inputs(Two(), {"attention_mask": mask, "input_ids": ids})) == ["input_ids", "attention_mask"]
    assert list(named_inputs(Two(), (ids, mask))) == ["input_ids", "attention_mask"]
    assert list(named_inputs(Two(), ids)) == ["input"]
    assert torch.equal(call_model(Two(), {"attention_mask": mask, "input_ids": ids}), ids * mask)


def test_token_classification_scores_every_token() -> None:
    task = Task()
    scores = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]])  # [N=1, T=3, C=2]
    labels = torch.tensor([[0, 1, 1]])
    assert task.correct(scores, labels) == (2, 3)
    assert task.loss(scores, labels).dim() == 0


def test_regression_losses_have_no_accuracy_and_sum_per_example() -> None:
    task = Task("mse")
    out, target = torch.zeros(4, 3), torch.ones(4, 3)
    assert not task.has_accuracy and task.correct(out, target) == (0, 0)
    assert float(task.loss(out, target)) == 1.0 and float(task.loss(out, target, reduction="sum")) == 4.0
    custom = Task(custom_loss=lambda o, t: (o - t).abs().mean())
    assert float(custom.loss(out, target, reduction="sum")) == 4.0 and not custom.has_accuracy


def test_a_batch_must_be_a_pair() -> None:
    assert split_batch([1, 2]) == (1, 2)
    with pytest.raises(ConfigError, match="must be \\(inputs, target\\)"):
        split_batch((1, 2, 3))
    with pytest.raises(ConfigError, match="unknown loss"):
        Task("hinge")
