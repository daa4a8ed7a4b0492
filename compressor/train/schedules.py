"""The learning-rate schedule as a pure function of (fractional) epoch.

Being a function of time rather than a stateful scheduler is what makes rewinding trivial: replaying
the schedule from its start, or from epoch ``r``, is just evaluating it at those times again.
"""

from __future__ import annotations

import bisect
import math

from compressor.config import PruneConfig


def learning_rate(config: PruneConfig, t: float) -> float:
    """LR at time ``t`` in epochs (``2.5`` = halfway through the third epoch)."""
    if config.warmup_epochs and t < config.warmup_epochs:
        # Linear warmup from (almost) zero; the floor avoids a wasted first step at LR exactly 0.
        return config.lr * max(t, 1e-3) / config.warmup_epochs
    if config.schedule == "cosine":
        span = max(config.epochs - config.warmup_epochs, 1)
        progress = min(max(t - config.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))
    drops = bisect.bisect_right(list(config.lr_drops), math.floor(t + 1e-9))
    return config.lr * config.gamma ** drops


def final_learning_rate(config: PruneConfig, steps_per_epoch: int) -> float:
    """The LR of the schedule's very last step: fine-tuning's fixed LR."""
    return learning_rate(config, config.epochs - 1.0 / max(steps_per_epoch, 1))
