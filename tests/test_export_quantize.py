"""``edgeprune export --quantize int8``: the int8 variant it adds, its accuracy, pruned zeros, --max-drop."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import onnx
import pytest

from compressor.export.model_dir import export_model, sha256_of
from compressor.export.quantize import add_int8_variant, dense_level_accuracy, dense_model, gemm_to_matmul, zeros_kept
from edge_runtime import InferenceSession
from tests.compressor_fixtures import TEMP_ROOT, cli, run_tiny, tree_snapshot
from tests.runtime_models import make, prune_global


@functools.lru_cache(maxsize=None)
def tiny_run(model: str) -> Path:
    out = TEMP_ROOT / f"quantize-{model}"
    run_tiny(out, model)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
def test_int8_variant_of_a_real_run_keeps_accuracy_and_zeros(tmp_path: Path, model: str) -> None:
    out = tmp_path / "m"
    code, stdout, stderr = cli(["export", str(tiny_run(model)), "--out", str(out), "--quantize", "int8",
                                "--layout", "external"])
    assert code == 0, stderr
    assert "seeded noise" not in stderr  # calibrated on the run's own digits
    assert any(line.startswith("int8 variant model.int8.onnx") for line in stdout.splitlines())
    manifest = json.loads((out / "manifest.json").read_text())
    fp32, int8 = manifest["variants"]
    assert (fp32["name"], fp32["file"], int8["name"], int8["file"]) == ("fp32", "model.onnx", "int8", "model.int8.onnx")
    assert manifest["files"]["model.int8.onnx"] == sha256_of(out / "model.int8.onnx")
    assert int8["size"] == (out / "model.int8.onnx").stat().st_size < fp32["size"]
    assert int8["method"] == ("static-qdq-per-channel" if model == "digits-cnn" else "dynamic")
    if model == "digits-cnn":
        assert int8["calibration_batches"] == 8
    # accuracy measured on the test split, for both variants; int8 within half a point of fp32
    assert abs(fp32["accuracy"] - manifest["accuracy"]) < 1e-9  # onnxruntime agrees with PyTorch's figure
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.005
    # every pruned zero of every quantized weight sits exactly on its zero point
    dense = dense_model(out)
    if model == "digits-mlp":
        gemm_to_matmul(dense)  # what the dynamic quantizer was given
    kept = zeros_kept(dense, onnx.load(str(out / "model.int8.onnx")))
    assert len(kept) == len(manifest["layers"]) and all(kept.values())
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in dense.graph.initializer if t.name in kept)
    assert zeros > 0
    # a reader that ignores `variants` still loads and checks the fp32 model
    assert InferenceSession(out, kernels="sparse", threads=1).variant["name"] == "fp32"


@pytest.mark.slow
def test_max_drop_refuses_a_variant_that_loses_too_much(tmp_path: Path) -> None:
    out = tmp_path / "m"
    code, _, stderr = cli(["export", str(tiny_run("digits-mlp")), "--out", str(out), "--layout", "external",
         "--quantize", "none"])
    assert code == 0, stderr
    before = json.loads((out / "manifest.json").read_text())
    measured = add_int8_variant(out, data_spec="digits", input_shape=(64,))[0].accuracy
    assert measured is not None
    out2 = tmp_path / "m2"
    cli(["export", str(tiny_run("digits-mlp")), "--out", str(out2), "--layout", "external",
         "--quantize", "none"])
    # a dense reference one point above what int8 reaches: a drop of 1 point > --max-drop 0.5
    result, = add_int8_variant(out2, data_spec="digits", input_shape=(64,), reference_accuracy=measured + 0.01,
                               max_drop=0.5)
    assert not result.shipped and "not shipped" in result.message and "\n" not in result.message
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["fp32"]
    assert "model.int8.onnx" not in manifest["files"] and not (out2 / "model.int8.onnx").exists()
    assert manifest["files"] == before["files"]
    assert sorted(p.name for p in out2.iterdir()) == ["manifest.json", "model.onnx", "weights.npz"]
    # the CLI measures the drop against the run's dense level
    dense = json.loads((tiny_run("digits-mlp") / "metrics.json").read_text())["methods"]["lr-rewind"][0]
    assert dense["level"] == 0 and dense_level_accuracy(tiny_run("digits-mlp"), None) == dense["accuracy"]
    code, stdout, stderr = cli(["export", str(tiny_run("digits-mlp")), "--out", str(tmp_path / "m4"),
                                "--max-drop", "100", "--quantize", "int8"])
    assert code == 0 and "int8 variant model.int8.onnx" in stdout, stderr
    # within the limit it ships
    out3 = tmp_path / "m3"
    cli(["export", str(tiny_run("digits-mlp")), "--out", str(out3), "--layout", "external",
         "--quantize", "none"])
    result, = add_int8_variant(out3, data_spec="digits", input_shape=(64,), reference_accuracy=measured + 0.001,
                               max_drop=0.5)
    assert result.shipped and (out3 / "model.int8.onnx").is_file()


def test_pruned_zeros_stay_zero_in_a_static_int8_conv_model(tmp_path: Path) -> None:
    model = prune_global(make("digits-cnn"), 0.9)
    export_model(model, tmp_path / "m", input_shape=(1, 8, 8), layout="external")
    warnings = []
    result, = add_int8_variant(tmp_path / "m", data_spec=None, input_shape=(1, 8, 8), warn=warnings.append)
    assert result.shipped and result.accuracy is None
    assert len(warnings) == 1 and "seeded noise" in warnings[0]  # no built-in data: says so, once
    kept = zeros_kept(dense_model(tmp_path / "m"), onnx.load(str(tmp_path / "m" / "model.int8.onnx")))
    assert len(kept) == 4 and all(kept.values())


@pytest.mark.parametrize("extra, message", [
    (["--fp16"], "--fp16"),
    (["--calibration-batches", "0"], "--calibration-batches"),
])
def test_export_refuses_bad_quantize_options_in_one_line(tmp_path: Path, extra: list, message: str) -> None:
    out = tmp_path / "m"
    out.mkdir()
    code, stdout, stderr = cli(["export", "--model", "digits-mlp", "--out", str(out), "--quantize", "int8", *extra])
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr
    assert tree_snapshot(out) == {}


def test_auto_ships_the_int8_variant_of_a_run_with_data_and_none_without(tmp_path: Path) -> None:
    """The default (--quantize auto): a run with built-in data gets its int8 variant, measured against
    the level's own fp32 accuracy; a model exported without data says in one line why it has none."""
    with_data = tmp_path / "run-export"
    code, stdout, stderr = cli(["export", str(tiny_run("digits-mlp")), "--out", str(with_data)])
    assert code == 0, stderr
    manifest = json.loads((with_data / "manifest.json").read_text())
    assert [v["name"] for v in manifest["variants"]] == ["fp32", "int8"] and manifest["format_version"] == 3
    assert any(line.startswith("int8 variant model.int8.onnx") for line in stdout.splitlines())
    assert InferenceSession(with_data, kernels="ort-int8", threads=1).variant["name"] == "int8"
    no_data = tmp_path / "model-export"
    code, stdout, stderr = cli(["export", "--model", "digits-mlp", "--out", str(no_data)])
    assert code == 0, stderr
    assert "no int8 variant: no data to calibrate" in stdout
    assert "variants" not in json.loads((no_data / "manifest.json").read_text())
    none = tmp_path / "none"
    code, stdout, stderr = cli(["export", str(tiny_run("digits-mlp")), "--out", str(none), "--quantize", "none"])
    assert code == 0 and not any("int8 variant" in line for line in stdout.splitlines()), stderr
    assert "variants" not in json.loads((none / "manifest.json").read_text())


DATA_FACTORY = '''
import torch
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits

def build():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    return DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=32), DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=64)
'''


@pytest.mark.slow
def test_int8_calibrates_and_measures_on_the_data_factory_the_user_names(tmp_path: Path) -> None:
    """A run whose data came from a factory: export --data FILE.py:FACTORY calibrates on it (no noise)."""
    factory = tmp_path / "my_data.py"
    factory.write_text(DATA_FACTORY)
    run = tmp_path / "run"
    code, _, stderr = cli(["compress", "--model", "digits-cnn", "--data", f"{factory}:build", "--epochs", "1",
                           "--target-sparsity", "0.5", "--out", str(run)], timeout=600)
    assert code == 0, stderr
    out = tmp_path / "m"
    code, stdout, stderr = cli(["export", str(run), "--out", str(out), "--data", f"{factory}:build",
                                "--quantize", "int8"], timeout=600)
    assert code == 0, stderr
    assert "seeded noise" not in stderr
    int8 = json.loads((out / "manifest.json").read_text())["variants"][1]
    assert int8["calibration_batches"] == 8 and int8["accuracy"] is not None and int8["accuracy"] > 0.5
