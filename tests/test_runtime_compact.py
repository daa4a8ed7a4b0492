"""Format 3 (compact storage): every weight once in weights.npz, fed to each engine at load.

Torch-free (the MODEL_DIRs come from tests/runtime_fixtures.py), so this file also runs in the pinned
Raspberry Pi OS venv (numpy 1.24, scipy 1.10, onnxruntime 1.19). The hostile cases generate their
folders here from the fixtures, with hashes made valid again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime import InferenceSession
from edge_runtime.onnx_check import read_model
from tests.hostile_model_dirs import assert_one_line_error, cli, edit_manifest, rehash
from tests.runtime_fixtures import copy_model_dir, example_input, model_dir, torch_output

FP32 = ["digits-mlp-compact", "resnet20-compact"]
INT8 = ["digits-mlp-int8-compact", "digits-cnn-int8-compact"]
COMPACT = FP32 + INT8 + ["digits-mlp-fp16-compact"]


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def stock(path: Path, x: np.ndarray) -> np.ndarray:
    """Stock onnxruntime, nothing fed: what any other tool sees in a plain ONNX file."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("name", COMPACT)
def test_model_onnx_holds_no_weights_and_the_npz_one_copy(name: str) -> None:
    folder = model_dir(name)
    manifest = manifest_of(folder)
    assert manifest["format_version"] == 3
    model = read_model(folder)
    fed = {n for n, info in manifest["tensors"].items() if info["onnx"] == "fed"}
    weights = {layer["weight"] for layer in manifest["layers"]}
    assert weights <= fed and not model.sparse_initializers
    placeholders = {t.name for t in model.initializers if t.is_external and not t.has_inline_data}
    assert placeholders == fed
    with np.load(folder / "weights.npz") as npz:
        members = set(npz.files)
        for weight in weights:  # each weight once: CSR arrays or the dense array, never both, no int64 coo
            info = manifest["tensors"][weight]
            csr = {f"{weight}.data", f"{weight}.indices", f"{weight}.indptr"}
            assert (csr <= members) == (info["storage"] == "csr") and (weight in members) != (info["storage"] == "csr")
            if info["storage"] == "csr":
                assert npz[f"{weight}.indices"].dtype in (np.uint8, np.uint16)
                assert npz[f"{weight}.data"].dtype == np.dtype(info["dtype"])
        assert not any(member.endswith(".coo") for member in members)


@pytest.mark.parametrize("kernels", ["ort", "sparse", "dense", "auto"])
@pytest.mark.parametrize("name", FP32)
def test_float32_compact_engines_equal_pytorch(name: str, kernels: str) -> None:
    x = example_input(name)
    got = InferenceSession(model_dir(name), kernels=kernels, threads=1).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, torch_output(name), atol=1e-4, rtol=0)


def test_float16_values_run_in_every_engine() -> None:
    name = "digits-mlp-fp16-compact"
    x = example_input(name)
    outputs = {k: InferenceSession(model_dir(name), kernels=k, threads=1).run(None, {"input": x})[0]
               for k in ("ort", "sparse", "dense")}
    assert manifest_of(model_dir(name))["tensors"]["net.0.weight"]["dtype"] == "float16"
    np.testing.assert_allclose(outputs["sparse"], outputs["ort"], atol=1e-4)
    np.testing.assert_allclose(outputs["dense"], outputs["ort"], atol=1e-4)
    reference = torch_output(name)
    assert np.max(np.abs(outputs["ort"] - reference)) <= 1e-2 * max(1.0, np.max(np.abs(reference)))


@pytest.mark.parametrize("name", INT8)
def test_int8_is_stored_once_and_every_engine_reads_it(name: str, tmp_path: Path) -> None:
    folder = model_dir(name)
    manifest = manifest_of(folder)
    int8 = [n for n, info in manifest["tensors"].items() if info["dtype"] == "int8"]
    assert sorted(int8) == sorted(layer["weight"] for layer in manifest["layers"])
    entry = next(v for v in manifest["variants"] if v["name"] == "int8")
    assert sorted(feed["tensor"] for feed in entry["feeds"].values()) == sorted(int8)
    x = example_input(name)
    run = lambda kernels: InferenceSession(folder, kernels=kernels, threads=1).run(None, {"input": x})[0]
    # the int8 engine computes exactly what stock onnxruntime computes on the same graph, weights inline
    plain = tmp_path / "int8.onnx"
    done = cli("to-onnx", str(folder), str(plain), "--variant", "int8")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(run("ort-int8"), stock(plain, x))
    # ... and exactly what the external layout's self-contained model.int8.onnx computes (same integers)
    external = model_dir(name.replace("-compact", ""))
    np.testing.assert_array_equal(run("ort-int8"), stock(external / "model.int8.onnx", x))
    # the fp32 engines run the same int8 values dequantized: they agree with each other
    fp32 = run("ort")
    np.testing.assert_allclose(run("sparse"), fp32, atol=1e-4)
    np.testing.assert_allclose(run("dense"), fp32, atol=1e-4)
    reference = torch_output(name)  # and stay within the int8 rounding of the trained weights
    assert np.max(np.abs(fp32 - reference)) <= 0.05 * max(1.0, float(np.max(np.abs(reference))))


@pytest.mark.parametrize("name", COMPACT + ["digits-cnn", "digits-mlp-fp16"])
def test_to_onnx_writes_one_plain_file_stock_onnxruntime_runs(name: str, tmp_path: Path) -> None:
    out = tmp_path / "plain.onnx"
    done = cli("to-onnx", str(model_dir(name)), str(out))
    assert done.returncode == 0 and "stock onnxruntime reproduces the sample" in done.stdout, done.stderr
    x = example_input(name)
    expected = InferenceSession(model_dir(name), kernels="ort", threads=1).run(None, {"input": x})[0]
    np.testing.assert_array_equal(stock(out, x), expected)
    # alone in another folder: nothing refers back to the MODEL_DIR
    alone = tmp_path / "elsewhere" / "m.onnx"
    alone.parent.mkdir()
    shutil.move(out, alone)
    np.testing.assert_array_equal(stock(alone, x), expected)
    assert_one_line_error(cli("to-onnx", str(model_dir(name)), str(alone)), "exists")


def test_to_onnx_of_a_model_without_the_variant_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(cli("to-onnx", str(model_dir("digits-mlp-compact")), str(tmp_path / "x.onnx"),
                              "--variant", "int8"), "no int8 variant")
    assert not (tmp_path / "x.onnx").exists()


# -- hostile compact folders ------------------------------------------------------------------------------
def rewrite_arrays(folder: Path, change) -> None:
    """weights.npz with changed arrays, hashes made valid again (format 3 has no offsets to re-point)."""
    with np.load(folder / "weights.npz", allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    change(arrays)
    with open(folder / "weights.npz", "wb") as handle:
        np.savez(handle, **arrays)
    rehash(folder)


def _index_out_of_range(a):
    a["net.0.weight.indices"][0] = 255


def _indptr_decreasing(a):
    a["net.0.weight.indptr"][1] = a["net.0.weight.indptr"][-1]


def _indices_too_short(a):
    a["net.0.weight.indices"] = a["net.0.weight.indices"][:-1]


def _scale_wrong_length(a):
    a["net.0.weight.scale"] = np.ones(3, np.float32)


def _scale_not_finite(a):
    a["net.0.weight.scale"] = np.full_like(a["net.0.weight.scale"], np.nan)


def _values_not_int8(a):
    a["net.0.weight.data"] = a["net.0.weight.data"].astype(np.float32)


@pytest.mark.parametrize("attack, needle", [
    (_index_out_of_range, "column index"), (_indptr_decreasing, "indptr decreases"),
    (_indices_too_short, "column indices for"), (_scale_wrong_length, "scale"),
    (_scale_not_finite, "not finite"), (_values_not_int8, "int8")], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_tampered_int8_arrays_are_refused_before_any_computation(tmp_path: Path, attack, needle: str) -> None:
    folder = copy_model_dir("digits-mlp-int8-compact", tmp_path)
    manifest = manifest_of(folder)
    assert manifest["tensors"]["net.0.weight"]["storage"] == "csr"
    rewrite_arrays(folder, attack)
    for kernels in ("auto", "sparse", "dense", "ort", "ort-int8"):
        assert_one_line_error(cli("check", str(folder), "--kernels", kernels), needle)
    assert_one_line_error(cli("to-onnx", str(folder), str(tmp_path / "x.onnx")), needle)


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["tensors"]["net.0.weight"].pop("scale"), "scale"),
    (lambda m: m["tensors"]["net.0.weight"].update(axis=1), "axis"),
    (lambda m: m["tensors"]["net.0.weight"].update(onnx="external"), "fed or inline"),
    (lambda m: next(v for v in m["variants"] if v["name"] == "int8")["feeds"].update(
        {"net.0.bias": {"tensor": "net.0.bias"}}), "feeds"),
    (lambda m: m.update(format_version=4), "not supported"),
])
def test_malformed_compact_manifests_are_one_line(tmp_path: Path, change, needle: str) -> None:
    folder = copy_model_dir("digits-mlp-int8-compact", tmp_path)
    edit_manifest(folder, change)
    kernels = "ort-int8" if needle == "feeds" else "auto"
    assert_one_line_error(cli("check", str(folder), "--kernels", kernels), needle)


def _gaps(folder: Path):
    manifest = manifest_of(folder)
    name = next(n for n, info in manifest["tensors"].items() if info.get("indices") == "delta")
    return name


@pytest.mark.parametrize("attack, needle", [
    (lambda a, n: a[f"{n}.indices"].__setitem__(1, 0), "repeats a column"),       # a duplicate column
    (lambda a, n: a[f"{n}.indices"].__setitem__(slice(None), 255), "outside"),    # runs past the last column
    (lambda a, n: a.__setitem__(f"{n}.indices", a[f"{n}.indices"].astype(np.uint16)), "uint8"),
], ids=["zero-gap", "past-the-end", "not-uint8"])
def test_tampered_uint8_gaps_are_refused(tmp_path: Path, attack, needle: str) -> None:
    folder = copy_model_dir("digits-cnn-int8-compact", tmp_path)
    name = _gaps(folder)
    rewrite_arrays(folder, lambda arrays: attack(arrays, name))
    for kernels in ("sparse", "ort", "ort-int8"):
        assert_one_line_error(cli("check", str(folder), "--kernels", kernels), needle)


def test_wide_weights_store_uint8_gaps_and_every_engine_agrees() -> None:
    for name in ("resnet20-compact", "digits-cnn-int8-compact"):
        folder = model_dir(name)
        gapped = [n for n, info in manifest_of(folder)["tensors"].items() if info.get("indices") == "delta"]
        assert gapped, name
        with np.load(folder / "weights.npz") as npz:
            assert all(npz[f"{n}.indices"].dtype == np.uint8 for n in gapped)
        x = example_input(name)
        outputs = [InferenceSession(folder, kernels=k, threads=1).run(None, {"input": x})[0] for k in ("ort", "sparse")]
        np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-4)


def test_a_placeholder_cannot_point_onnxruntime_at_another_file(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    folder = copy_model_dir("digits-mlp-compact", tmp_path)
    (tmp_path / "secret").write_bytes(np.ones(64 * 64, np.float32).tobytes())
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == "net.0.weight")
    for entry in tensor.external_data:
        entry.value = "../secret"
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    rehash(folder)
    for kernels in ("auto", "ort", "sparse"):
        assert_one_line_error(cli("check", str(folder), "--kernels", kernels), "placeholder")


def test_the_int8_file_must_use_the_scales_the_fp32_engines_use(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    folder = copy_model_dir("digits-cnn-int8-compact", tmp_path)
    path = folder / "model.int8.onnx"
    model = onnx.load(str(path), load_external_data=False)
    scale = next(t for t in model.graph.initializer if t.name == "features.3.weight_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))
    path.write_bytes(model.SerializeToString())
    rehash(folder)
    assert_one_line_error(cli("check", str(folder), "--kernels", "ort-int8"), "differs")
    assert_one_line_error(cli("to-onnx", str(folder), str(tmp_path / "x.onnx"), "--variant", "int8"), "differs")
