"""The runtime's int8 variant (``kernels="ort-int8"``) and ``auto`` choosing among native, onnxruntime
fp32 and onnxruntime int8. Torch-free: runs in tests/pinned_runtime.sh's onnxruntime 1.19 venv too."""

from __future__ import annotations

import re

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime import InferenceSession
from edge_runtime.errors import ModelDirError
from tests.runtime_fixtures import copy_model_dir, example_input, model_dir, torch_output

REPO = Path(__file__).resolve().parent.parent
INT8 = ("digits-mlp-int8", "digits-cnn-int8")


def edge_runtime(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("name", INT8)
def test_int8_engine_matches_onnxruntime_on_the_same_quantized_graph(name: str) -> None:
    x = example_input(name)
    session = InferenceSession(model_dir(name), kernels="ort-int8", threads=1)
    assert session.engine == "ort-int8" and session.variant["name"] == "int8"
    reference = ort.InferenceSession(str(model_dir(name) / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    expected = reference.run(None, {"input": x})[0]
    got = session.run(None, {"input": x})[0]
    assert np.array_equal(got, expected)
    # it is a quantized model: close to the fp32 one, but not the same computation
    assert 0 < np.max(np.abs(got - torch_output(name))) < 0.1 * np.max(np.abs(torch_output(name)))


@pytest.mark.parametrize("kernels", ["sparse", "dense", "ort"])
def test_fp32_engines_of_a_quantized_model_dir_still_match_torch(kernels: str) -> None:
    name = "digits-cnn-int8"
    session = InferenceSession(model_dir(name), kernels=kernels, threads=1)
    assert session.variant["name"] == "fp32"
    got = session.run(None, {"input": example_input(name)})[0]
    assert np.max(np.abs(got - torch_output(name))) <= 1e-4


@pytest.mark.parametrize("name", INT8)
def test_auto_picks_one_of_the_three_engines_and_caches_it(tmp_path: Path, name: str) -> None:
    target = copy_model_dir(name, tmp_path)
    first = InferenceSession(target, kernels="auto", threads=1)
    plan = first.plan
    assert not plan["cached"]
    # all three were measured, or native skipped by the cost model (a CNN: convolutions run best in onnxruntime)
    assert set(plan["engine_ms"]) | set(plan.get("skipped", {})) == {"native", "ort", "ort-int8"}
    assert ("native" in plan.get("skipped", {})) == name.startswith("digits-cnn")
    assert plan["engine"] in plan["engine_ms"]
    assert first.engine == plan["engine"]
    assert first.variant["name"] == ("int8" if plan["engine"] == "ort-int8" else "fp32")
    second = InferenceSession(target, kernels="auto", threads=1)
    assert second.plan["cached"] and second.plan["engine"] == plan["engine"] and second.engine == first.engine
    x = example_input(name)
    assert np.array_equal(second.run(None, {"input": x})[0], first.run(None, {"input": x})[0])
    # deploy's smoke test passes whichever engine auto kept (an int8 engine checks its own sample)
    done = edge_runtime("check", str(target), "--threads", "1")
    assert done.returncode == 0, done.stderr
    info = edge_runtime("info", str(target), "--threads", "1")
    assert info.returncode == 0 and re.search(rf"engine {re.escape(plan['engine'])}[ ;]", info.stdout), info.stdout
    starred = [line for line in info.stdout.splitlines() if line.startswith("variant") and "*" in line]
    assert len(starred) == 1 and starred[0].split()[1].rstrip("*") == first.variant["name"]


def test_ort_int8_without_the_variant_is_one_line_and_exit_2() -> None:
    with pytest.raises(ModelDirError, match="no int8 variant"):
        InferenceSession(model_dir("digits-mlp"), kernels="ort-int8", threads=1)
    done = edge_runtime("check", str(model_dir("digits-mlp")), "--kernels", "ort-int8")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--quantize int8" in done.stderr


def test_auto_on_a_model_dir_without_variants_times_native_and_ort_only(tmp_path: Path) -> None:
    session = InferenceSession(copy_model_dir("digits-mlp", tmp_path), kernels="auto", threads=1)
    assert set(session.plan["engine_ms"]) == {"native", "ort"}


@pytest.mark.parametrize("entry", [
    {"name": "int8", "file": "../outside.onnx", "engine": "ort-int8"},     # a path out of MODEL_DIR
    {"name": "int8", "file": "unlisted.onnx", "engine": "ort-int8"},       # a file no sha256 covers
    {"name": 8, "file": "model.int8.onnx"},                                # malformed
])
def test_a_variant_entry_not_covered_by_the_hashes_is_ignored(tmp_path: Path, entry: dict) -> None:
    target = copy_model_dir("digits-mlp-int8", tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["variants"] = [v for v in manifest["variants"] if v["name"] != "int8"] + [entry]
    (target / "manifest.json").write_text(json.dumps(manifest))
    done = edge_runtime("run", str(target), "--kernels", "ort-int8", "--input", str(tmp_path / "x.npy"))
    assert done.returncode == 2 and "no int8 variant" in done.stderr


def test_bench_json_names_engine_variant_and_its_accuracy() -> None:
    done = edge_runtime("bench", str(model_dir("digits-mlp-int8")), "--kernels", "ort-int8", "--threads", "1",
                        "--iters", "3", "--warmup", "0", "--min-seconds", "0", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    manifest = json.loads((model_dir("digits-mlp-int8") / "manifest.json").read_text())
    int8 = next(v for v in manifest["variants"] if v["name"] == "int8")
    assert report["engine"] == "ort-int8"
    assert report["variant"] == {"name": "int8", "accuracy": int8["accuracy"], "size": int8["size"]}


def _weight_steps(name: str) -> list:
    """The native program's weight steps (forced CSR kernels) of a fixture MODEL_DIR."""
    session = InferenceSession(model_dir(name), kernels="sparse", threads=1)
    return [step for step in session._program.steps if step.weight]


def test_an_int8_export_builds_the_same_native_program_as_the_plain_one() -> None:
    # the same pruned model exported plain and with --quantize int8 (both compact): int8-stored weights are
    # dequantized at load, and must become the same CSR kernels -- not plain dense ops (issue 19's slowdown)
    plain, int8 = _weight_steps("digits-mlp-compact"), _weight_steps("digits-mlp-int8-compact")
    assert len(plain) == 3
    assert [(s.op_type, s.weight, s.kernel_kind, type(s.kernel)) for s in int8] == \
        [(s.op_type, s.weight, s.kernel_kind, type(s.kernel)) for s in plain]
    for ours, theirs in zip(int8, plain):
        a, b = ours.kernel.matrix, theirs.kernel.matrix
        for matrix in (a, b):
            assert (matrix.data.dtype, matrix.indices.dtype, matrix.indptr.dtype) == (np.float32, np.int32, np.int32)
            assert all(x.flags.c_contiguous for x in (matrix.data, matrix.indices, matrix.indptr))
            assert matrix.has_sorted_indices
        assert a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        # values: the plain ones, up to half a quantization step (7-bit weights, reduce_range: scale <= max|w| / 63)
        assert np.max(np.abs(a.data - b.data)) <= np.max(np.abs(b.data)) / 126 * 1.001


def test_every_conv_and_gemm_of_a_quantized_cnn_runs_a_weight_kernel() -> None:
    steps = InferenceSession(model_dir("digits-cnn-int8-compact"), kernels="sparse", threads=1)._program.steps
    layers = [step for step in steps if step.op_type in ("Conv", "Gemm", "MatMul")]
    assert layers and all(step.weight and step.kernel_kind == "sparse" for step in layers)


def _plant_plan(target: Path, plan: dict, threads: int = 1) -> None:
    """Write ``plan`` into target/plans.json under the key this device and thread count look up."""
    from edge_runtime.model_dir import read_manifest
    from edge_runtime.plan import plan_key

    key = plan_key(read_manifest(target), threads)
    (target / "plans.json").write_text(json.dumps({key: plan}))


@pytest.mark.parametrize("name, plan", [
    ("digits-mlp-compact", {"engine": "ort-int8", "layers": {}}),     # a variant the model does not have
    ("cumsum", {"engine": "native", "layers": {}}),                   # native cannot run this model
])
def test_a_cached_plan_that_does_not_fit_the_model_is_retuned(tmp_path: Path, name: str, plan: dict) -> None:
    target = copy_model_dir(name, tmp_path)
    _plant_plan(target, plan)
    session = InferenceSession(target, kernels="auto", threads=1)
    assert not session.plan["cached"] and session.plan["ignored_cached_plan"]
    assert session.engine in ("native", "ort") and session.engine != plan["engine"]
    x = example_input(name)
    assert np.max(np.abs(session.run(None, {"input": x})[0] - torch_output(name))) <= 1e-4
    # the retuned plan replaced the bad one: the next load uses it
    assert InferenceSession(target, kernels="auto", threads=1).plan["cached"]
    _plant_plan(target, plan)
    np.save(tmp_path / "x.npy", x)
    for command in (["run", "--input", str(tmp_path / "x.npy")], ["check"],
                    ["bench", "--iters", "2", "--warmup", "0", "--min-seconds", "0"]):
        done = edge_runtime(command[0], str(target), "--threads", "1", *command[1:])
        assert done.returncode == 0, (command, done.stderr)


def test_the_tuner_times_every_engine_the_way_run_calls_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing bare engines left out the cost each call pays in ``run`` (the feed check, onnxruntime's
    call, the native outputs' dtypes), which differs by engine: the tuner must time what ``run`` does."""
    timed: list = []
    checked: list = []
    run_ort, run_native, check_feed = (InferenceSession._run_ort, InferenceSession._run_native,
                                       InferenceSession._check_feed)

    def counting(kind: str, original):
        return lambda self, engine, names, feed: timed.append((kind, id(engine))) or original(self, engine, names, feed)

    monkeypatch.setattr(InferenceSession, "_run_ort", counting("onnxruntime", run_ort))
    monkeypatch.setattr(InferenceSession, "_run_native", counting("native", run_native))
    monkeypatch.setattr(InferenceSession, "_check_feed", lambda self, feed: checked.append(1) or check_feed(self, feed))
    session = InferenceSession(copy_model_dir("digits-mlp-int8", tmp_path), kernels="auto", threads=1)
    assert set(session.plan["engine_ms"]) == {"native", "ort", "ort-int8"}
    engines = {kind: {engine for k, engine in timed if k == kind} for kind in ("onnxruntime", "native")}
    assert len(engines["onnxruntime"]) == 2 and len(engines["native"]) == 1  # fp32 and int8 sessions; the program
    assert len(checked) >= len(timed)  # every timed call checked its feed, as run() does
