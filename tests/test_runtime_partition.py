"""Per-part engines (edge_runtime/partition.py): a conv stem in onnxruntime, the weight layers after it
native. Every split computes what the whole-model engines compute. Torch-free; times nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import InferenceSession
from edge_runtime.errors import ModelDirError
from edge_runtime.model_dir import Weights, read_manifest
from edge_runtime.partition import find_cut
from tests.runtime_fixtures import copy_model_dir, example_input, model_dir

SPLITTABLE = ("resnet20-compact", "digits-cnn-int8-compact")


def _cut(name: str):
    manifest = read_manifest(model_dir(name))
    weights = Weights(model_dir(name), manifest)
    try:
        return find_cut(manifest, weights), manifest
    finally:
        weights.close()


@pytest.mark.parametrize("name", SPLITTABLE)
def test_a_split_model_computes_what_the_whole_model_engines_compute(name: str) -> None:
    x = example_input(name)
    split = InferenceSession(model_dir(name), kernels="split", threads=1)
    assert split.engine == "split" and split.plan["cut"]
    got = split.run(None, {"input": x})[0]
    for kernels in ("ort", "sparse", "dense"):
        whole = InferenceSession(model_dir(name), kernels=kernels, threads=1).run(None, {"input": x})[0]
        assert np.max(np.abs(got - whole)) <= 1e-4, kernels


@pytest.mark.parametrize("name", SPLITTABLE)
def test_the_cut_is_before_the_first_matrix_layer_after_the_last_conv(name: str) -> None:
    cut, manifest = _cut(name)
    nodes = manifest["graph"]
    assert nodes[cut.index]["op_type"] in ("Gemm", "MatMul")
    assert "Conv" in {node["op_type"] for node in nodes[:cut.index]}
    assert "Conv" not in {node["op_type"] for node in nodes[cut.index:]}
    assert cut.tensor in nodes[cut.index]["inputs"] or any(cut.tensor in n["inputs"] for n in nodes[cut.index:])


def test_a_model_without_convolutions_is_not_split() -> None:
    assert _cut("digits-mlp-compact")[0] is None
    with pytest.raises(ModelDirError, match="no place to split"):
        InferenceSession(model_dir("digits-mlp-compact"), kernels="split", threads=1)


def _plant(target: Path, plan: dict) -> None:
    from edge_runtime.plan import plan_key

    (target / "plans.json").write_text(json.dumps({plan_key(read_manifest(target), 1): plan}))


def test_a_cached_split_plan_loads_the_split_and_a_wrong_cut_is_retuned(tmp_path: Path) -> None:
    name = "resnet20-compact"
    target = copy_model_dir(name, tmp_path)
    cut = _cut(name)[0]
    _plant(target, {"engine": "split", "cut": cut.tensor, "layers": {}})
    session = InferenceSession(target, kernels="auto", threads=1)
    assert session.plan["cached"] and session.engine == "split"
    expected = InferenceSession(target, kernels="ort", threads=1).run(None, {"input": example_input(name)})[0]
    assert np.max(np.abs(session.run(None, {"input": example_input(name)})[0] - expected)) <= 1e-4
    _plant(target, {"engine": "split", "cut": "no-such-tensor", "layers": {}})
    retuned = InferenceSession(target, kernels="auto", threads=1)
    assert not retuned.plan["cached"] and "does not fit" in retuned.plan["ignored_cached_plan"]


def test_the_cli_checks_a_split_model_and_refuses_one_without_a_cut_in_one_line() -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    check = lambda name: subprocess.run([sys.executable, "-m", "edge_runtime", "check", str(model_dir(name)),  # noqa: E731
                                         "--kernels", "split", "--threads", "1"],
                                        capture_output=True, text=True, env=env, timeout=120)
    assert check("resnet20-compact").returncode == 0
    refused = check("digits-mlp-compact")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "no place to split" in refused.stderr


def test_the_tuner_times_the_split_with_one_thread_kernels_and_keeps_what_wins(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """At 2 threads the per-layer timings may pick the thread-pool kernel, which loses inside a split to
    onnxruntime's still-spinning threads: the split is timed again with one-thread kernels, and the
    plan keeps the kinds of the split that won (here forced by the timings)."""
    from edge_runtime import cost, plan as plans
    from edge_runtime.session import SPLIT, SPLIT_SERIAL

    target = copy_model_dir("resnet20-compact", tmp_path)
    monkeypatch.setattr(cost, "native_gain_bound", lambda manifest, weights: 10.0)  # time native and the splits
    monkeypatch.setattr(plans, "choose_layer_kinds",
                        lambda program, make, sample, kinds: {s.weight: {"sparse-mt": 0.1, "sparse": 1.0}
                                                              for s in program.steps if s.weight})
    timed = {}

    def compare(candidates, **kwargs):
        timed.update({name: fn for name, fn in candidates.items()})
        return {name: {SPLIT_SERIAL: 1.0, SPLIT: 2.0}.get(name, 9.0) for name in candidates}

    monkeypatch.setattr(plans, "compare", compare)
    session = InferenceSession(target, kernels="auto", threads=2)
    assert set(timed) >= {SPLIT, SPLIT_SERIAL, "ort", "native"}
    assert session.engine == SPLIT and "sparse-mt" not in session.plan["layers"].values()
    x = example_input("resnet20-compact")
    expected = InferenceSession(target, kernels="ort", threads=1).run(None, {"input": x})[0]
    assert np.max(np.abs(session.run(None, {"input": x})[0] - expected)) <= 1e-4
    cached = InferenceSession(target, kernels="auto", threads=2)
    assert cached.plan["cached"] and cached.engine == SPLIT and cached.plan["layers"] == session.plan["layers"]
    assert np.max(np.abs(cached.run(None, {"input": x})[0] - expected)) <= 1e-4
