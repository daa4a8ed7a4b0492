"""The retraining methods as objects: which epochs, which LRs, which weights a pruning round starts from.

- ``lr-rewind`` (Renda et al. 2020, the default): keep the trained weights, replay the whole LR
  schedule from epoch 0.
- ``finetune``: keep the trained weights, train as long at the schedule's final (small) LR.
- ``weight-rewind`` (lottery ticket): reset surviving weights to their values at ``rewind_epoch`` of
  dense training and replay the schedule from that epoch to its end.

A new method is one class here and one line in ``REGISTRY`` (and its name in ``config.METHODS``);
the pipeline asks a method what to do instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterable

from compressor.config import PruneConfig
from compressor.train.schedules import final_learning_rate, learning_rate


@dataclass(frozen=True)
class RetrainPlan:
    """The epochs to run (absolute, which is what the LR is evaluated at) and how to start."""

    epochs: range
    lr_at: Callable[[float], float]
    rewind_weights: bool = False


def _constant(value: float, _t: float) -> float:
    return value


class Method:
    """A retraining method: ``plan`` for one round; ``rewinds_weights`` when it needs the dense
    training's snapshot at ``--rewind-epoch`` (the pipeline saves it only if some method does)."""

    name = ""
    rewinds_weights = False

    def plan(self, config: PruneConfig, steps_per_epoch: int) -> RetrainPlan:
        raise NotImplementedError


class LRRewind(Method):
    name = "lr-rewind"

    def plan(self, config: PruneConfig, steps_per_epoch: int) -> RetrainPlan:
        return RetrainPlan(range(config.epochs), partial(learning_rate, config))


class FineTune(Method):
    name = "finetune"

    def plan(self, config: PruneConfig, steps_per_epoch: int) -> RetrainPlan:
        return RetrainPlan(range(config.epochs), partial(_constant, final_learning_rate(config, steps_per_epoch)))


class WeightRewind(Method):
    name = "weight-rewind"
    rewinds_weights = True

    def plan(self, config: PruneConfig, steps_per_epoch: int) -> RetrainPlan:
        return RetrainPlan(range(config.rewind_epoch, config.epochs), partial(learning_rate, config),
                           rewind_weights=True)


REGISTRY: Dict[str, Method] = {m.name: m for m in (LRRewind(), FineTune(), WeightRewind())}


def method_named(name: str) -> Method:
    """The method object for ``name`` (``PruneConfig`` validated the names: a KeyError here is a bug)."""
    return REGISTRY[name]


def any_rewinds_weights(names: Iterable[str]) -> bool:
    """Whether one of these methods needs the dense training's rewind snapshot."""
    return any(method_named(name).rewinds_weights for name in names)


def dense_plan(config: PruneConfig) -> RetrainPlan:
    """Level 0: the full schedule from scratch."""
    return RetrainPlan(range(config.epochs), partial(learning_rate, config))


def retrain_plan(method: str, config: PruneConfig, steps_per_epoch: int) -> RetrainPlan:
    """The plan for one retraining round of ``method``."""
    return method_named(method).plan(config, steps_per_epoch)
