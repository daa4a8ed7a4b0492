"""A load's checks run partly in threads (sha256s, CSR decoding): what fails, and what is reported, is
what it was when they ran one after another.

Torch-free (the MODEL_DIRs come from tests/runtime_fixtures.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import InferenceSession
from edge_runtime.errors import ModelDirError
from edge_runtime.model_dir import FolderFiles, Weights, read_manifest
from edge_runtime.npz_reader import NpzArchive
from tests.hostile_model_dirs import rehash
from tests.runtime_fixtures import copy_model_dir, example_input

NAME = "resnet20-compact"  # format 3, CSR weights with delta indices


def _csr_weight(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    return next(name for name, info in manifest["tensors"].items()
                if info["storage"] == "csr" and info.get("indices") == "delta")


def _zero_gaps(folder: Path, weight: str) -> None:
    """Set one CSR weight's delta indices to 0 in place (columns repeat: invalid CSR arrays)."""
    path = folder / "weights.npz"
    member = NpzArchive(path, 1 << 40).members[f"{weight}.indices"]
    data = bytearray(path.read_bytes())
    data[member.offset:member.offset + member.nbytes] = bytes(member.nbytes)
    path.write_bytes(bytes(data))


def test_a_file_failing_its_sha256_is_reported_before_what_its_bytes_break(tmp_path: Path) -> None:
    folder = copy_model_dir(NAME, tmp_path / "m")
    _zero_gaps(folder, _csr_weight(folder))  # hash not made valid again: both the hash and the CSR fail
    for kernels in ("auto", "ort", "sparse"):
        with pytest.raises(ModelDirError, match="weights.npz fails its sha256 check"):
            InferenceSession(folder, kernels=kernels, threads=1)


def test_invalid_csr_arrays_decoded_in_the_thread_are_the_load_error(tmp_path: Path) -> None:
    folder = copy_model_dir(NAME, tmp_path / "m")
    weight = _csr_weight(folder)
    _zero_gaps(folder, weight)
    rehash(folder)
    for kernels in ("auto", "ort", "sparse"):
        with pytest.raises(ModelDirError, match=f"{weight}.*invalid CSR arrays"):
            InferenceSession(folder, kernels=kernels, threads=1)


def test_a_hash_the_thread_finds_wrong_fails_confirm_and_not_read(tmp_path: Path) -> None:
    folder = copy_model_dir(NAME, tmp_path / "m")
    path = folder / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    files = FolderFiles(folder, read_manifest(folder))
    files.verify_all(background=True)
    assert files.read("model.onnx").endswith(b"\0")  # the bytes are there to check, not yet to use
    with pytest.raises(ModelDirError, match="model.onnx fails its sha256 check"):
        files.confirm()


def test_every_engine_computes_the_same_from_the_ahead_of_time_arrays(tmp_path: Path) -> None:
    """onnxruntime fed the dense weights the thread made, the native kernels fed their own copies."""
    folder = copy_model_dir(NAME, tmp_path / "m")
    x = example_input(NAME)
    reference = InferenceSession(folder, kernels="ort", verify=False, threads=1)  # no threads: read as asked
    expected = reference.run(None, {reference.get_inputs()[0].name: x})[0]
    for kernels in ("ort", "sparse", "dense", "auto"):
        session = InferenceSession(folder, kernels=kernels, threads=1)
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected,
                                   rtol=1e-4, atol=1e-4)


def test_stored_csr_arrays_are_read_only_and_the_kernels_get_copies(tmp_path: Path) -> None:
    folder = copy_model_dir(NAME, tmp_path / "m")
    manifest = read_manifest(folder)
    files = FolderFiles(folder, manifest)
    files.verify_all()
    weights = Weights(folder, manifest, files)
    weights.decode_sparse_ahead(dense_feeds=True)
    weights.check_all()
    weight = _csr_weight(folder)
    data, _, _ = weights.csr_arrays(weight)
    matrix = weights.csr(weight)
    assert not data.flags.writeable and matrix.data.flags.writeable and matrix.indices.flags.writeable
    np.testing.assert_array_equal(weights.dense(weight).reshape(matrix.shape), matrix.toarray())
    weights.close()


def test_the_collector_is_as_the_caller_left_it_after_a_load(tmp_path: Path) -> None:
    import gc

    folder = copy_model_dir(NAME, tmp_path / "m")
    assert gc.isenabled()
    InferenceSession(folder, kernels="ort", threads=1)
    assert gc.isenabled()
    with pytest.raises(ModelDirError):
        InferenceSession(tmp_path / "missing", threads=1)
    assert gc.isenabled()
    gc.disable()
    try:
        InferenceSession(folder, kernels="ort", threads=1)
        assert not gc.isenabled()
    finally:
        gc.enable()
