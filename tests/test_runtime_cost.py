"""The tuner's cost model (edge_runtime/cost.py): which candidates ``auto`` does not even time.
Times nothing; torch-free (fixtures are prebuilt MODEL_DIRs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime import InferenceSession, cost
from edge_runtime.cost import _window_output
from edge_runtime.model_dir import Weights, read_manifest
from tests.runtime_fixtures import copy_model_dir, example_input, model_dir, torch_output


def _bound_and_sizes(name: str):
    manifest = read_manifest(model_dir(name))
    weights = Weights(model_dir(name), manifest)
    try:
        return cost.native_gain_bound(manifest, weights), cost.output_sizes(manifest, weights)
    finally:
        weights.close()


def test_window_output_sizes_follow_onnx_rules() -> None:
    assert _window_output((32, 32), {"pads": [1, 1, 1, 1]}, [3, 3], False) == (32, 32)
    assert _window_output((224, 224), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, [3, 3], False) == (112, 112)
    assert _window_output((5, 5), {"strides": [2, 2]}, [2, 2], True) == (3, 3)    # ceil_mode
    assert _window_output((5, 5), {"strides": [2, 2]}, [2, 2], False) == (2, 2)
    assert _window_output((7, 9), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, [3, 3], False) == (4, 5)
    assert _window_output((6, 6), {"dilations": [2, 2]}, [3, 3], False) == (2, 2)
    assert _window_output((2, 2), {}, [3, 3], False) is None  # a window larger than its input: not guessed
    assert _window_output((8, 8), {"strides": [1]}, [3, 3], False) is None  # attributes of the wrong rank


def test_a_cnn_is_bounded_by_its_convolutions_and_an_mlp_by_its_non_zeros() -> None:
    bound, sizes = _bound_and_sizes("resnet20")
    assert bound < cost.WORTH_TIMING
    assert list(sizes.values())[0] == (32, 32) and list(sizes.values())[-1] == ()  # first conv, the fc head
    bound, sizes = _bound_and_sizes("digits-mlp")  # 90% sparse: at most 10× (all matrix-vector layers)
    assert set(sizes.values()) == {()} and 9.0 <= bound <= 10.5


def test_auto_does_not_time_a_native_program_that_cannot_win(tmp_path: Path) -> None:
    target = copy_model_dir("resnet20", tmp_path)
    session = InferenceSession(target, kernels="auto", threads=1)
    assert session.engine == "ort" and "cost model" in session.plan["skipped"]["native"]
    assert "native" not in (session.plan.get("engine_ms") or {}) and session._program is None
    got = session.run(None, {"input": example_input("resnet20")})[0]
    assert np.max(np.abs(got - torch_output("resnet20"))) <= 1e-4
    again = InferenceSession(target, kernels="auto", threads=1)
    assert again.plan["cached"] and again.engine == "ort"


def test_auto_still_times_native_where_it_can_win(tmp_path: Path) -> None:
    session = InferenceSession(copy_model_dir("digits-mlp", tmp_path), kernels="auto", threads=1)
    assert "skipped" not in session.plan and "native" in session.plan["engine_ms"]
