"""`edgeprune export` writes format 3 by default (compressor/export/compact.py): real runs, every value type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compressor.export.compact import compact_model_dir
from compressor.errors import ExportError
from compressor.export.quantize import add_int8_variant
from edge_runtime import InferenceSession
from edge_runtime.model_dir import Weights, read_manifest, read_sample
from edge_runtime.model_format import shipped_bytes
from tests.compressor_fixtures import cli, tree_snapshot
from tests.test_export_quantize import tiny_run


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def export(run: Path, out: Path, *extra: str) -> str:
    code, stdout, stderr = cli(["export", str(run), "--out", str(out), *extra])
    assert code == 0, stderr
    return stdout


def sample_check(folder: Path, kernels: str) -> float:
    """Max abs difference of an engine's output on the MODEL_DIR's sample from what it records."""
    from edge_runtime import variants

    manifest = read_manifest(folder)
    feed, expected, atol = read_sample(folder, manifest)
    session = InferenceSession(folder, kernels=kernels, threads=1)
    expected, atol = variants.expected_sample(manifest, session.engine) or (expected, atol)  # auto: what it chose
    got = session.run(None, feed)[0]
    diff = float(np.max(np.abs(got - expected)))
    assert diff <= atol, (kernels, diff, atol)
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits-mlp", "digits-cnn"])
def test_int8_export_stores_int8_once_and_keeps_accuracy(tmp_path: Path, model: str) -> None:
    run = tiny_run(model)
    external, compact = tmp_path / "external", tmp_path / "compact"
    export(run, external, "--quantize", "int8", "--layout", "external")
    stdout = export(run, compact, "--quantize", "int8")
    assert "format 3" in stdout and "int8 values" in stdout and "edge-runtime to-onnx" in stdout
    old, new = manifest_of(external), manifest_of(compact)
    assert (old["format_version"], new["format_version"]) == (1, 3)
    assert shipped_bytes(compact, new) < shipped_bytes(external, old) / 2
    assert all(new["tensors"][layer["weight"]]["dtype"] == "int8" for layer in new["layers"])
    fp32_old, int8_old = old["variants"]
    fp32_new, int8_new = new["variants"]
    # the int8 variant computes exactly what it did (same integers, now fed): same accuracy
    assert int8_new["accuracy"] == int8_old["accuracy"] and int8_new["method"] == int8_old["method"]
    # the fp32 engines run the int8 values dequantized, measured again: within half a point of fp32
    assert fp32_new["weights"] == "int8 dequantized"
    assert abs(fp32_new["accuracy"] - fp32_old["accuracy"]) <= 0.005
    assert abs(int8_new["accuracy"] - fp32_old["accuracy"]) <= 0.005
    # pruned zeros stay zeros: every zero of the trained weights is a zero of the stored int8 values
    weights_old, weights_new = Weights(external, old), Weights(compact, new)
    try:
        for layer in new["layers"]:
            trained = weights_old.dense(layer["weight"])
            assert np.all(weights_new.quantized(layer["weight"])[trained == 0] == 0)
    finally:
        weights_old.close()
        weights_new.close()
    for kernels in ("ort", "sparse", "dense", "ort-int8", "auto"):
        sample_check(compact, kernels)


@pytest.mark.slow
def test_float32_and_float16_compact_exports(tmp_path: Path) -> None:
    run = tiny_run("digits-cnn")
    external, fp32, fp16 = tmp_path / "external", tmp_path / "fp32", tmp_path / "fp16"
    export(run, external, "--layout", "external", "--quantize", "none")
    export(run, fp32, "--quantize", "none")  # fp32 only: the default would ship int8 as the one copy
    export(run, fp16, "--quantize", "fp16")
    sizes = {f.name: shipped_bytes(f, read_manifest(f)) for f in (external, fp32, fp16)}
    assert sizes["fp16"] < sizes["fp32"] < sizes["external"]
    # float32 compact storage is lossless: the same outputs as the external layout, bit for bit
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    for kernels in ("ort", "sparse"):
        a = InferenceSession(external, kernels=kernels, threads=1).run(None, {"input": x})[0]
        b = InferenceSession(fp32, kernels=kernels, threads=1).run(None, {"input": x})[0]
        np.testing.assert_array_equal(a, b)
    assert manifest_of(fp16)["values_dtype"] == "float16"
    assert manifest_of(fp16)["tensors"]["features.3.weight"]["dtype"] == "float16"
    for kernels in ("ort", "sparse", "dense"):
        sample_check(fp16, kernels)
    # the --fp16 spelling writes the same folder
    export(run, tmp_path / "fp16b", "--fp16")
    assert manifest_of(tmp_path / "fp16b")["tensors"] == manifest_of(fp16)["tensors"]


def test_compacting_is_idempotent_and_a_compact_folder_is_not_quantized_twice(tmp_path: Path) -> None:
    from tests.runtime_models import make, prune_global
    from compressor.export.model_dir import export_model
    folder = tmp_path / "m"
    export_model(prune_global(make("digits-mlp"), 0.9), folder, input_shape=(64,), layout="external")
    first = compact_model_dir(folder)
    assert first["format_version"] == 3 and compact_model_dir(folder) == first
    before = tree_snapshot(folder)
    with pytest.raises(ExportError, match="already compact"):
        add_int8_variant(folder, data_spec=None, input_shape=(64,))
    assert tree_snapshot(folder) == before
    with pytest.raises(ExportError, match="values must be"):
        compact_model_dir(tmp_path / "m", "int4")


def test_square_weights_the_quantizer_transposed_are_stored_the_right_way_round(tmp_path: Path) -> None:
    """onnxruntime's dynamic quantizer needs MatMul, so a Linear's [out, in] weight reaches it transposed;
    for a square weight the shape cannot tell, the values must (a wrong guess computes garbage)."""
    import torch
    from torch import nn

    from compressor.export.model_dir import export_model
    from tests.runtime_models import prune_global

    torch.manual_seed(0)
    model = prune_global(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                       nn.Linear(64, 10)), 0.5)
    folder = tmp_path / "m"
    export_model(model, folder, input_shape=(64,), layout="external")
    add_int8_variant(folder, data_spec=None, input_shape=(64,))
    manifest = compact_model_dir(folder)
    assert [manifest["tensors"][layer["weight"]]["dtype"] for layer in manifest["layers"]] == ["int8"] * 3
    feeds = next(v for v in manifest["variants"] if v["name"] == "int8")["feeds"]
    assert all(feed["transpose"] for feed in feeds.values())
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    for kernels in ("ort", "sparse", "ort-int8"):
        got = InferenceSession(folder, kernels=kernels, threads=1).run(None, {"input": x})[0]
        assert np.max(np.abs(got - reference)) <= 0.05 * np.max(np.abs(reference)), kernels


def test_uint8_gaps_round_trip_across_long_gaps_and_empty_rows() -> None:
    from compressor.export.onnx_sparse import encode_csr, encode_delta_csr
    from edge_runtime.model_dir import undelta

    weight = np.zeros((5, 1000), np.float32)
    weight[0, [0, 1, 700, 999]] = [1, 2, 3, 4]   # gaps 0, 1, 699 (two explicit zeros), 299 (one)
    weight[2, 999] = 5                            # a first entry far from column 0
    weight[4, 255:257] = [6, 7]                   # gaps of exactly 255 and 1
    members = encode_delta_csr(weight, np.dtype(np.float32))
    assert members["indices"].dtype == np.uint8 and members["data"].size == 7 + 2 + 1 + 3
    indices = undelta("w", members["indices"], members["indptr"], 1000)
    rows = np.repeat(np.arange(5), np.diff(members["indptr"]))
    rebuilt = np.zeros_like(weight)
    rebuilt[rows, indices] = members["data"]
    np.testing.assert_array_equal(rebuilt, weight)
    assert np.all(np.diff(indices)[np.diff(rows) == 0] > 0)  # strictly increasing in each row
    # and it pays: 1 byte per gap against 2 per uint16 column, for a few explicit zeros
    plain = encode_csr(weight, np.dtype(np.float32))
    assert plain.indices.dtype == np.uint16 and members["indices"].nbytes < plain.indices.nbytes
