"""Per-model presets meet the user's overrides."""

import pytest

from compressor.config import config_for
from compressor.errors import ConfigError


def test_preset_lr_drops_follow_a_shorter_schedule():
    assert config_for("resnet20").lr_drops == (91, 136)
    short = config_for("resnet20", epochs=10)
    assert short.lr_drops == (5, 7)  # the paper's drops at the same fractions of training


def test_explicit_lr_drops_win_over_the_preset():
    assert config_for("resnet20", epochs=10, lr_drops="2,8").lr_drops == (2, 8)


def test_drops_that_can_never_happen_are_refused():
    with pytest.raises(ConfigError, match="would never happen"):
        config_for("digits-mlp", epochs=10, lr_drops="5,12")


def test_none_means_a_constant_learning_rate():
    assert config_for("digits-mlp", epochs=4, lr_drops="none").lr_drops == ()


def test_a_run_written_before_loss_and_output_existed_still_resumes() -> None:
    """Keys added to PruneConfig later (loss, output) compare equal at their default, and only there."""
    from compressor.config import PruneConfig, config_differences

    current = PruneConfig().to_dict()
    old = {k: v for k, v in current.items() if k not in ("loss", "output")}
    assert config_differences(old, current) == []
    assert config_differences(old, PruneConfig(loss="mse").to_dict()) == ["loss: None -> 'mse'"]
