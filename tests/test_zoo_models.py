"""Real architectures through the whole flow: compress (1 epoch, small random data) → export → runtime.

Each model goes through the ``edgeprune`` CLI as a user would (``--model file.py:factory``, ``--data
file.py:factory``), then its MODEL_DIR runs in ``edge_runtime`` with every kernels choice: the native
engines where their ops cover the model (else they must refuse with UnsupportedOpError), onnxruntime
and ``auto`` always. Outputs must match the PyTorch level within 1e-4 on fresh inputs of another batch
size. Models come from ``tests/zoo_models.py`` (Hugging Face ones from tiny configs, no downloads).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compressor.train.batches import call_model, pick_output, split_batch
from compressor.run.run_dir import load_level
from edge_runtime import InferenceSession
from edge_runtime.errors import UnsupportedOpError
from edgeprune.cli import main
from tests import zoo_models

REPO = Path(__file__).resolve().parent.parent

ZOO = Path(zoo_models.__file__)
TOLERANCE = 1e-4
NATIVE = ("sparse", "dense")


def _needs_transformers() -> Any:
    return pytest.mark.skipif(not _has("transformers"), reason="transformers is not installed (test extra)")


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# name, model factory, data factory, extra compress flags, whether native kernels must cover it
CASES = [
    pytest.param("user_cnn", "random_digits", [], False, id="user-cnn-view-hardswish-depthwise"),
    pytest.param("plain_cnn", "random_digits", [], True, id="plain-cnn-reshape"),
    pytest.param("two_inputs", "pair_data", ["--output", "logits"], True, id="two-inputs-dict-output"),
    pytest.param("bert", "text_data", [], False, id="hf-bert", marks=_needs_transformers()),
    pytest.param("distilbert", "text_dataset", [], False, id="hf-distilbert-map-style-dataset",
                 marks=_needs_transformers()),
    pytest.param("vit", "image_data", [], False, id="hf-vit", marks=_needs_transformers()),
]


def _cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def _fresh_inputs(data: str) -> Any:
    """A batch of 3 fresh examples (the export traced batch 2 and sampled batch 1)."""
    _, test = getattr(zoo_models, data)()
    inputs, _ = split_batch(test[0] if isinstance(test, list) else next(iter(torch.utils.data.DataLoader(test, 8))))
    if isinstance(inputs, dict):
        return {k: v[:3] for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(v[:3] for v in inputs)
    return inputs[:3]


def _feed(session: InferenceSession, inputs: Any) -> Dict[str, np.ndarray]:
    arrays: List[torch.Tensor] = list(inputs.values()) if isinstance(inputs, dict) else (
        list(inputs) if isinstance(inputs, tuple) else [inputs])
    names = [arg.name for arg in session.get_inputs()]
    if isinstance(inputs, dict):
        return {name: inputs[name].numpy() for name in names}
    return {name: array.numpy() for name, array in zip(names, arrays)}


@pytest.mark.parametrize("model, data, flags, native", CASES)
def test_compress_export_run(tmp_path: Path, model: str, data: str, flags: List[str], native: bool) -> None:
    run_dir, model_dir = tmp_path / "run", tmp_path / "model"
    assert _cli("compress", "--model", f"{ZOO}:{model}", "--data", f"{ZOO}:{data}", "--epochs", 1,
                "--target-sparsity", 0.5, "--one-shot", "--lr", 0.01, "--out", run_dir, *flags) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [level["level"] for level in metrics["methods"]["lr-rewind"]] == [0, 1]
    # a run never runs the files it names; fp32 only: this compares the engines with PyTorch to 1e-4, which an
    # int8 variant's dequantized weights (the default when data is named) would not meet
    trust = ("--model", f"{ZOO}:{model}", "--data", f"{ZOO}:{data}", "--quantize", "none")
    assert _cli("export", run_dir, "--out", model_dir, *trust) == 0
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert abs(manifest["sparsity"] - 0.5) < 0.01

    level = load_level(run_dir, model=f"{ZOO}:{model}")
    inputs = _fresh_inputs(data)
    with torch.no_grad():
        expected = pick_output(call_model(level.model, inputs), "logits" if flags else None)[1].numpy()
    # the manifest records every input with a free batch axis and its dtype
    names = list(inputs) if isinstance(inputs, dict) else None
    assert [spec["shape"][0] for spec in manifest["inputs"]] == ["batch"] * len(manifest["inputs"])
    if names is not None:
        assert sorted(spec["name"] for spec in manifest["inputs"]) == sorted(names)
        assert {spec["name"]: spec["dtype"] for spec in manifest["inputs"]} == {
            name: str(inputs[name].numpy().dtype) for name in names}
    assert manifest["input"] == manifest["inputs"][0]
    assert manifest["format_version"] == 3  # compact storage, whatever the inputs

    engines = {}
    for kernels in (*NATIVE, "auto", "ort"):
        try:
            session = InferenceSession(model_dir, kernels=kernels, threads=1)
        except UnsupportedOpError:
            assert kernels in NATIVE and not native, f"{kernels} refused a model its ops should cover"
            continue
        try:
            got = session.run(None, _feed(session, inputs))[0]
            engines[kernels] = session.engine
        finally:
            session.close()
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert float(np.max(np.abs(got - expected))) <= TOLERANCE, kernels
    assert engines["ort"] == "ort"
    if native:
        assert engines["sparse"] == engines["dense"] == "native"
    # shape/axes/index constants stay inline in model.onnx, where onnxruntime's shape inference reads them
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    for tensor in graph.initializer:
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL):
            assert not tensor.external_data, tensor.name
    # one command from a plain ONNX file that stock onnxruntime runs, equal to the runtime's own onnxruntime
    plain = tmp_path / "plain.onnx"
    assert subprocess.run([sys.executable, "-m", "edge_runtime", "to-onnx", str(model_dir), str(plain)],
                          capture_output=True, cwd=REPO).returncode == 0
    stock = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    feed = _feed(stock, inputs)
    np.testing.assert_array_equal(stock.run(None, feed)[0],
                                  InferenceSession(model_dir, kernels="ort", threads=1).run(None, feed)[0])
    assert _cli("export", run_dir, "--out", model_dir, "--force", *trust) == 0  # export is repeatable
    # the external layout: formats 1-2 by inputs, and stock onnxruntime loads its model.onnx as it is
    assert _cli("export", run_dir, "--out", model_dir, "--force", "--layout", "external", *trust) == 0
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["format_version"] == (1 if len(manifest["inputs"]) == 1
                                          and manifest["input"]["dtype"] == "float32" else 2)
    external = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(external.run(None, feed)[0], stock.run(None, feed)[0])


@pytest.mark.parametrize("data, flags", [
    pytest.param("regression_data", ["--loss", "mse"], id="loss-mse"),
    pytest.param("regression_with_loss", [], id="factory-loss"),
])
def test_a_regression_head_trains_with_its_loss(tmp_path: Path, data: str, flags: List[str]) -> None:
    """Float targets with --loss mse or the data factory's own loss: the run completes, the loss is
    recorded and accuracy (meaningless here) is null (strict JSON) rather than a made-up number."""
    run_dir = tmp_path / "run"
    assert _cli("compress", "--model", f"{ZOO}:two_inputs", "--data", f"{ZOO}:{data}", "--epochs", 1,
                "--target-sparsity", 0.5, "--one-shot", "--lr", 0.01, "--out", run_dir, *flags) == 0
    levels = json.loads((run_dir / "metrics.json").read_text())["methods"]["lr-rewind"]
    assert len(levels) == 2
    assert all(level["accuracy"] is None and np.isfinite(level["loss"]) for level in levels)
    assert json.loads((run_dir / "config.json").read_text())["loss"] == (flags[1] if flags else "cross-entropy")


def test_digits_follow_a_model_without_input_shape(tmp_path: Path) -> None:
    """A user CNN that declares no input_shape gets the digits as 1×8×8 images (its first layer is a
    Conv2d), and trains; an MLP-like model still gets the flat 64-vector."""
    from compressor.train.data import input_shape_for, load_data

    cnn = zoo_models.user_cnn()
    assert not hasattr(cnn, "input_shape") and input_shape_for(cnn) == (1, 8, 8)
    train, _ = load_data("digits", input_shape_for(cnn), 16, 0)
    x, y = next(iter(train))
    assert tuple(x.shape) == (16, 1, 8, 8) and cnn(x).shape == (16, 10)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert input_shape_for(mlp) == (64,)


@pytest.mark.parametrize("model, data, flags, needle", [
    pytest.param("plain_cnn", "pair_data", [], "cannot take a batch", id="wrong-inputs"),
    pytest.param("two_inputs", "pair_data", ["--output", "pooler"], "no output 'pooler'", id="unknown-output"),
    pytest.param("plain_cnn", "random_digits", ["--loss", "mse"], "loss mse cannot compare", id="loss-shape"),
    pytest.param("plain_cnn", "not_pairs", [], "must be (inputs, target)", id="not-pairs"),
])
def test_a_model_the_compressor_cannot_drive_is_refused_up_front(
        tmp_path: Path, capsys: pytest.CaptureFixture, model: str, data: str, flags: List[str], needle: str) -> None:
    out = tmp_path / "run"
    code = _cli("compress", "--model", f"{ZOO}:{model}", "--data", f"{ZOO}:{data}", "--epochs", 1,
                "--out", out, *flags)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_export_refuses_an_unknown_output_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = _cli("export", "--model", f"{ZOO}:two_inputs", "--out", tmp_path / "m", "--output", "nope",
                "--sample", _pair_sample(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no output 'nope'" in err
    assert not (tmp_path / "m").exists()


def test_export_with_a_sample_file_of_keyword_inputs(tmp_path: Path) -> None:
    """``--sample inputs.npz`` feeds a model with several inputs of several dtypes (no RUN_DIR)."""
    assert _cli("export", "--model", f"{ZOO}:two_inputs", "--out", tmp_path / "m",
                "--sample", _pair_sample(tmp_path)) == 0
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [(s["name"], s["dtype"]) for s in manifest["inputs"]] == [("features", "float32"), ("mask", "int64")]
    assert manifest["outputs"] == ["logits"] and manifest["output_specs"][0]["shape"] == ["batch", 3]
    from edge_runtime.cli import main as runtime_main

    assert runtime_main(["check", str(tmp_path / "m"), "--kernels", "sparse"]) == 0


def _pair_sample(tmp_path: Path) -> Path:
    path = tmp_path / "inputs.npz"
    rng = np.random.default_rng(0)
    np.savez(path, features=rng.standard_normal((2, 16)).astype(np.float32),
             mask=rng.integers(0, 2, (2, 16)).astype(np.int64))
    return path
