"""What each retraining method does after a pruning round: which epochs, which LRs, which weights.

- ``lr-rewind`` (Renda et al. 2020, the default): keep the trained weights, replay the whole LR
  schedule from epoch 0.
- ``finetune``: keep the trained weights, train as long at the schedule's final (small) LR.
- ``weight-rewind`` (lottery ticket): reset surviving weights to their values at ``rewind_epoch`` of
  dense training and replay the schedule from that epoch to its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from compressor.config import PruneConfig
from compressor.schedules import final_learning_rate, learning_rate


@dataclass(frozen=True)
class RetrainPlan:
    """The epochs to run (absolute, which is what the LR is evaluated at) and how to start."""

    epochs: range
    lr_at: Callable[[float], float]
    rewind_weights: bool = False


def _constant(value: float, _t: float) -> float:
    return value


def dense_plan(config: PruneConfig) -> RetrainPlan:
    """Level 0: the full schedule from scratch."""
    return RetrainPlan(range(config.epochs), partial(learning_rate, config))


def retrain_plan(method: str, config: PruneConfig, steps_per_epoch: int) -> RetrainPlan:
    """The plan for one retraining round of ``method``."""
    if method == "lr-rewind":
        return RetrainPlan(range(config.epochs), partial(learning_rate, config))
    if method == "finetune":
        return RetrainPlan(range(config.epochs), partial(_constant, final_learning_rate(config, steps_per_epoch)))
    if method == "weight-rewind":
        return RetrainPlan(range(config.rewind_epoch, config.epochs), partial(learning_rate, config),
                           rewind_weights=True)
    raise ValueError(f"unknown method {method!r}")  # PruneConfig validated it: a bug if reached
