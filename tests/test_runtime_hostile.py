"""A MODEL_DIR from someone else stays harmless (issue 9): every hostile folder is generated here, with
its hashes made valid again, and must end in a ModelDirError / one line + exit 2 — never a crash, a
read outside the folder, a huge allocation or a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import InferenceSession, ModelDirError
from edge_runtime.model_dir import Weights, check_csr
from tests.hostile_model_dirs import (REPO, assert_one_line_error, cli, edit_manifest, edit_onnx, make_external,
                                      rehash, rewrite_npz, set_external)
from tests.runtime_fixtures import copy_model_dir

KERNELS = ("auto", "sparse", "dense", "ort")


# -- 1. CSR arrays ----------------------------------------------------------------------------------
def _negative_index(a):
    a["net.0.weight.indices"] = a["net.0.weight.indices"].astype(np.int32)
    a["net.0.weight.indices"][3] = -1


def _decreasing_indptr(a):
    a["net.0.weight.indptr"][1] = a["net.0.weight.indptr"][-1]


def _indptr_not_from_zero(a):
    a["net.0.weight.indptr"][0] = 1


def _short_indptr(a):
    a["net.0.weight.indptr"] = a["net.0.weight.indptr"][:-1]


def _float_indices(a):
    a["net.0.weight.indices"] = a["net.0.weight.indices"].astype(np.float32)


def _index_too_big(a):
    a["net.0.weight.indices"] = a["net.0.weight.indices"].astype(np.uint16)
    a["net.0.weight.indices"][0] = 128


CSR_ATTACKS = [_negative_index, _decreasing_indptr, _indptr_not_from_zero, _short_indptr, _float_indices,
               _index_too_big]


@pytest.mark.parametrize("attack", CSR_ATTACKS, ids=lambda f: f.__name__.strip("_"))
def test_crafted_csr_arrays_are_refused_before_scipy(tmp_path: Path, attack) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    rewrite_npz(target, attack)
    for kernels in KERNELS:  # before: SIGSEGV (exit -11/139) with every kernels choice
        assert_one_line_error(cli("check", str(target), "--kernels", kernels), "invalid CSR arrays")


def test_check_csr_unit() -> None:
    data, indices, indptr = np.ones(3, np.float32), np.array([0, 2, 1], np.int64), np.array([0, 2, 3], np.int32)
    check_csr("w", data, indices, indptr, 2, 3)
    for bad_indices, bad_indptr in [([0, -1, 1], [0, 2, 3]), ([0, 2, 1], [0, 3, 2, 3][:3]),
                                    ([0, 2, 3], [0, 2, 3]), ([0, 2, 1], [0, 2, 4])]:
        with pytest.raises(ModelDirError, match="invalid CSR"):
            check_csr("w", data, np.array(bad_indices), np.array(bad_indptr), 2, 3)
    with pytest.raises(ModelDirError, match="indptr"):
        check_csr("w", data, indices, np.array([0, 3, 2], np.int32), 2, 3)


# -- 2. one owner of the format -----------------------------------------------------------------------
def test_the_format_has_one_owner() -> None:
    """Only edge_runtime/model_format.py spells the format's name; only edge_runtime/safe_io.py defines
    the sha256 helper every side uses."""
    owners, hashers = [], []
    for folder in ("edge_runtime", "compressor", "deploy", "benchmarks", "edgeprune"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if '"edgeprune-model"' in text or "SUPPORTED_VERSIONS = " in text:
                owners.append(str(path.relative_to(REPO)))
            if "def sha256_of" in text:
                hashers.append(str(path.relative_to(REPO)))
    assert owners == ["edge_runtime/model_format.py"] and hashers == ["edge_runtime/safe_io.py"]
    from compressor.export import model_dir as export
    from edge_runtime import model_format, safe_io
    assert export.FORMAT_VERSION in model_format.SUPPORTED_VERSIONS and export.sha256_of is safe_io.sha256_of


def test_deploy_refuses_an_unsupported_format_version_before_connecting(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, lambda m: m.update(format_version=99))
    with socket.socket() as listener:  # a port that accepts nothing: connecting would be the error
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "edgeprune", "deploy", f"nobody@127.0.0.1:{port}", str(target),
                           "--name", "m"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "format version 99 is not supported" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# -- 3. external data ---------------------------------------------------------------------------------
BIAS = "net.4.bias"  # 40 bytes, so /etc/passwd is long enough for onnxruntime 1.19 to load it as the bias


def _bias(model):
    return next(t for t in model.graph.initializer if t.name == BIAS)


def _external(model) -> object:
    """The first tensor model.onnx keeps as external data (a weight's values)."""
    stored = [*model.graph.initializer, *(s.values for s in model.graph.sparse_initializer)]
    return next(t for t in stored if t.external_data)


@pytest.mark.parametrize("location", ["/etc/passwd", "../../../../../../../../../../../../etc/passwd",
                                      "link.bin", "model.onnx"])
def test_external_data_outside_the_npz_is_refused(tmp_path: Path, location: str) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    (target / "link.bin").symlink_to("/etc/passwd")
    # the bias is small, so export keeps it inline: the attacker declares it external, in both files
    edit_manifest(target, lambda m: m["tensors"][BIAS].update(onnx="external"))
    edit_onnx(target, lambda model: make_external(_bias(model), location, 0, 40))
    for kernels in ("ort", "sparse"):  # before (onnxruntime 1.19): /etc/passwd loaded as a weight
        with pytest.raises(ModelDirError):
            InferenceSession(target, kernels=kernels, verify=False)
        assert_one_line_error(cli("check", str(target), "--kernels", kernels), "only weights.npz is allowed")


def test_external_offsets_must_point_at_their_own_member(tmp_path: Path) -> None:
    from compressor.export.onnx_npz import member_offsets

    target = copy_model_dir("digits-mlp", tmp_path)
    offset, length = member_offsets(target / "weights.npz")["sample.input"]
    edit_onnx(target, lambda model: set_external(_external(model), offset=offset, length=length))
    assert_one_line_error(cli("check", str(target), "--kernels", "ort"), "points at bytes other than")


def test_inline_constants_must_equal_the_npz_copy(tmp_path: Path) -> None:
    """onnxruntime reads an inline constant from model.onnx, the native kernels its copy in the npz:
    a bias changed in one file only would make the two engines compute different functions."""
    import onnx
    from onnx import numpy_helper

    target = copy_model_dir("digits-mlp", tmp_path)
    assert json_manifest(target)["tensors"][BIAS]["onnx"] == "inline"

    def poison(model: onnx.ModelProto) -> None:
        bias = _bias(model)
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, BIAS))
    edit_onnx(target, poison)
    for kernels in ("ort", "sparse"):
        assert_one_line_error(cli("check", str(target), "--kernels", kernels), f"inline initializer {BIAS!r} differs")


def test_a_constant_the_manifest_calls_external_must_be_external(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, lambda m: m["tensors"][BIAS].update(onnx="external"))
    rehash(target)
    assert_one_line_error(cli("check", str(target), "--kernels", "ort"), "must be external data in weights.npz")


def test_a_csr_weight_cannot_be_declared_inline(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    weight = next(n for n, info in json_manifest(target)["tensors"].items() if info["storage"] == "csr")
    edit_manifest(target, lambda m: m["tensors"][weight].update(onnx="inline"))
    rehash(target)
    assert_one_line_error(cli("check", str(target)), "malformed manifest")


def json_manifest(model_dir: Path) -> dict:
    import json

    return json.loads((model_dir / "manifest.json").read_text())


# -- 4. one graph ---------------------------------------------------------------------------------------
def test_manifest_graph_must_be_model_onnx_graph(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, lambda m: m["graph"][2].update(op_type="Sigmoid"))  # manifest isn't hashed
    assert_one_line_error(cli("check", str(target), "--kernels", "sparse"), "differs from the manifest's graph")
    target = copy_model_dir("digits-cnn", tmp_path / "b")
    edit_onnx(target, lambda model: model.graph.node[4].attribute[3].ints.__setitem__(0, 3))  # MaxPool kernel
    assert_one_line_error(cli("check", str(target), "--kernels", "ort"), "differs from the manifest's graph")


def test_sparse_indices_in_model_onnx_must_match_the_csr(tmp_path: Path) -> None:
    from onnx import numpy_helper

    def shift(model) -> None:
        indices = model.graph.sparse_initializer[0].indices
        values = numpy_helper.to_array(indices).copy()
        values[0] += 1
        indices.CopyFrom(numpy_helper.from_array(values, indices.name))

    target = copy_model_dir("digits-mlp", tmp_path)
    edit_onnx(target, shift)
    assert_one_line_error(cli("check", str(target), "--kernels", "ort"), "sparse indices")


# -- 5. memory bombs ----------------------------------------------------------------------------------
def _limited(limit_bytes: int):
    def apply() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return apply


def test_compressed_npz_is_refused(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    with np.load(target / "weights.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["bomb"] = np.zeros(50_000_000, np.float32)  # 200 MB that deflates to ~200 KB
    np.savez_compressed(target / "weights.npz", **arrays)
    rehash(target)
    assert (target / "weights.npz").stat().st_size < 2_000_000
    assert_one_line_error(cli("check", str(target), preexec_fn=_limited(3 << 30)), "compressed")


def test_member_header_larger_than_its_bytes_is_refused(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    data = bytearray((target / "weights.npz").read_bytes())
    old = b"'shape': (10,), }          "  # net.4.bias; the header's space padding absorbs the change
    new = b"'shape': (1000000000,), }  "  # 4 GB declared, 40 bytes present
    at = data.index(old)
    data[at:at + len(old)] = new
    (target / "weights.npz").write_bytes(bytes(data))
    rehash(target)
    done = cli("check", str(target), preexec_fn=_limited(3 << 30))
    assert_one_line_error(done, "weights.npz")


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["tensors"]["net.4.weight"].update(shape=[128, 5_000_000]), "EDGEPRUNE_MAX_MODEL_BYTES"),
    (lambda m: m["input"].update(shape=["batch", 4000, 4000, 1000]), "EDGEPRUNE_MAX_MODEL_BYTES"),  # 59.6 GiB
])
def test_huge_declared_shapes_are_refused_before_allocating(tmp_path: Path, change, needle: str) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, change)
    for command in ("check", "bench", "run", "info"):
        extra = ["--input", str(tmp_path / "x.npy")] if command == "run" else []
        extra += ["--iters", "1", "--min-seconds", "0", "--warmup", "0"] if command == "bench" else []
        assert_one_line_error(cli(command, str(target), *extra, preexec_fn=_limited(3 << 30)), needle)


def test_bench_batch_too_big_is_refused_and_memory_error_is_one_line(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    args = ("bench", str(target), "--kernels", "sparse", "--iters", "1", "--min-seconds", "0", "--warmup", "0")
    assert_one_line_error(cli(*args, "--batch", "100000000"), "EDGEPRUNE_MAX_MODEL_BYTES")
    # Allowed by the limit, but more than this process may have: out of memory is one line too.
    done = cli(*args, "--batch", "20000000", env={**os.environ, "EDGEPRUNE_MAX_MODEL_BYTES": str(1 << 40)},
               preexec_fn=_limited(3 << 30))
    assert_one_line_error(done, "out of memory")


def test_bench_feeds_every_input_and_counts_their_bytes_together(monkeypatch) -> None:
    from edge_runtime.bench import random_feed
    from edge_runtime.errors import InputError
    from edge_runtime.session import NodeArg

    specs = [NodeArg("ids", ["batch", 100], "tensor(int64)"), NodeArg("x", ["batch", 100], "tensor(float)")]
    monkeypatch.setenv("EDGEPRUNE_MAX_MODEL_BYTES", "2000")
    feed = random_feed(specs, 1, 0)  # 800 + 400 bytes
    assert {k: (v.dtype.name, v.shape) for k, v in feed.items()} == {"ids": ("int64", (1, 100)),
                                                                     "x": ("float32", (1, 100))}
    with pytest.raises(InputError, match="EDGEPRUNE_MAX_MODEL_BYTES"):  # 1600 + 800: each fits, not both
        random_feed(specs, 2, 0)
    with pytest.raises(InputError, match="EDGEPRUNE_MAX_MODEL_BYTES"):  # the int64 input alone: 2400
        random_feed(specs[:1], 3, 0)


def test_a_sample_that_does_not_fit_the_inputs_is_refused_before_tuning(tmp_path: Path) -> None:
    """The tuner times both engines on the npz's sample: onnxruntime would raise its own untyped error."""
    target = copy_model_dir("digits-mlp", tmp_path)
    rewrite_npz(target, lambda arrays: arrays.update({"sample.input": np.zeros((1, 7), np.float32)}))
    with pytest.raises(ModelDirError, match="sample does not fit its inputs"):
        InferenceSession(target, kernels="auto", retune=True)


# -- 6. names, special files, malformed manifests ------------------------------------------------------
@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_unsafe_file_names_are_refused_unopened(tmp_path: Path, name: str) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"secret")
    edit_manifest(target, lambda m: m["files"].update({name: "0" * 64}))
    assert_one_line_error(cli("check", str(target)), "unsafe file name")


def test_an_empty_files_table_is_not_verified(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, lambda m: m.update(files={}))
    done = cli("check", str(target))  # before: "ok ...: sha256 verified" with nothing verified
    assert_one_line_error(done, "does not list model.onnx and weights.npz")
    assert "verified" not in done.stdout


@pytest.mark.parametrize("victim", ["weights.npz", "model.onnx", "manifest.json"])
@pytest.mark.parametrize("kind", ["fifo", "symlink-out", "directory"])
def test_special_files_are_refused_without_blocking(tmp_path: Path, victim: str, kind: str) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    outside = tmp_path / "outside"
    outside.write_bytes((target / victim).read_bytes())
    (target / victim).unlink()
    if kind == "fifo":
        os.mkfifo(target / victim)  # before: `check` blocked forever reading it
    elif kind == "symlink-out":
        (target / victim).symlink_to(outside)
    else:
        (target / victim).mkdir()
    done = cli("check", str(target), timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(ModelDirError):
        InferenceSession(target, kernels="ort", verify=False)


MALFORMED = {
    "node without attributes": lambda m: m["graph"][0].pop("attributes"),
    "inputs not a list": lambda m: m["graph"][1].update(inputs="x"),
    "negative tensor dim": lambda m: m["tensors"]["net.0.bias"].update(shape=[-128]),
    "non-string output name": lambda m: m.update(outputs=[7]),
    "negative input dim": lambda m: m["input"].update(shape=["batch", -64]),
    "input dtype object": lambda m: m["input"].update(dtype="object"),
    "unknown storage": lambda m: m["tensors"]["net.0.weight"].update(storage="coo"),
    "layers of wrong type": lambda m: m.update(layers=[{"name": 1}]),
    "atol not a number": lambda m: m["sample"].update(atol="tiny"),
    "version as a string": lambda m: m.update(format_version="1"),
    "empty graph": lambda m: m.update(graph=[]),
    "absurd attribute": lambda m: m["graph"][0]["attributes"].update(axis=10 ** 30),
    "attribute of wrong type": lambda m: m["graph"][1]["attributes"].update(transB={"x": 1}),
    "manifest is a list": lambda m: m.clear(),
    "int64 input in format 1": lambda m: [spec.update(dtype="int64") for spec in (m["input"], m["inputs"][0])],
    "inputs not starting with input": lambda m: m["inputs"][0].update(name="other"),
    "two inputs in format 1": lambda m: m["inputs"].append(dict(m["input"], name="second")),
    "sample.inputs for an unknown input": lambda m: m["sample"].update(inputs={"nope": "sample.input"}),
    "int64 output in format 1": lambda m: m["output_specs"][0].update(dtype="int64"),
    "opset as a string": lambda m: m.update(opset="17"),
    "unknown onnx place": lambda m: m["tensors"]["net.0.bias"].update(onnx="url"),
}


def _two_inputs(manifest: dict, dtypes: tuple, width: int) -> dict:
    """A format-2 manifest with two inputs of these dtypes, ``width`` elements per example each."""
    specs = [{"name": f"in{i}", "shape": ["batch", width], "dtype": dtype} for i, dtype in enumerate(dtypes)]
    return dict(manifest, format_version=2, input=specs[0], inputs=specs, tensors={},
                sample=dict(manifest["sample"], inputs={"in0": "sample.input", "in1": "sample.input.1"}))


def test_format_2_inputs_of_any_dtype_sized_by_their_itemsize(tmp_path: Path, monkeypatch) -> None:
    from edge_runtime.model_format import validate_manifest

    manifest = json_manifest(copy_model_dir("digits-mlp", tmp_path))
    monkeypatch.setenv("EDGEPRUNE_MAX_MODEL_BYTES", "1000")
    validate_manifest(_two_inputs(manifest, ("int64", "bool"), 100), "m")  # 800 + 100 bytes
    validate_manifest(_two_inputs(manifest, ("uint8", "bool"), 400), "m")  # 1 byte each: 800 bytes
    with pytest.raises(ModelDirError, match="EDGEPRUNE_MAX_MODEL_BYTES"):
        validate_manifest(_two_inputs(manifest, ("int64", "bool"), 200), "m")  # one int64 input: 1600 bytes
    with pytest.raises(ModelDirError, match="all inputs would take 1,200 bytes"):
        validate_manifest(_two_inputs(manifest, ("int32", "float32"), 150), "m")  # 600 each, 1200 together
    with pytest.raises(ModelDirError, match="input dtype 'object'"):
        validate_manifest(_two_inputs(manifest, ("int64", "object"), 1), "m")


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_manifests_are_one_line(tmp_path: Path, name: str) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, MALFORMED[name])
    done = cli("check", str(target))  # before: e.g. KeyError: 'attributes' tracebacks
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and "manifest" in done.stderr
    info = cli("info", str(target))  # reads only the manifest: it may describe a folder it won't run
    assert info.returncode in (0, 2) and "Traceback" not in info.stderr, info.stderr


def test_hostile_attributes_in_model_and_manifest_alike_are_one_line(tmp_path: Path) -> None:
    """A consistent folder (graph equal in both files, hashes valid) with nonsense attribute values."""
    target = copy_model_dir("digits-mlp", tmp_path)

    def axis(model) -> None:
        model.graph.node[0].attribute[0].i = 10 ** 12
    edit_onnx(target, axis)
    edit_manifest(target, lambda m: m["graph"][0]["attributes"].update(axis=10 ** 12))
    for kernels in ("sparse", "ort"):
        done = cli("check", str(target), "--kernels", kernels)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr


def test_weights_reader_refuses_a_truncated_member(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    data = (target / "weights.npz").read_bytes()
    (target / "weights.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelDirError, match="weights.npz"):
        Weights(target, {"tensors": {}})


def test_a_hostile_plan_cache_is_ignored(tmp_path: Path) -> None:
    """plans.json is neither shipped nor hashed: a FIFO or a plan naming unknown kernels is no plan."""
    import json

    from edge_runtime import plan as plans

    target = copy_model_dir("digits-mlp", tmp_path)
    os.mkfifo(target / "plans.json")  # before: `check`/`bench` blocked reading it
    assert plans.load_cached(target, "k") is None
    (target / "plans.json").unlink()
    (target / "plans.json").write_text(json.dumps({"k": {"engine": "native", "layers": {"net.0.weight": "evil"}}}))
    assert plans.load_cached(target, "k") is None
    (target / "plans.json").write_text(json.dumps({"k": {"engine": "ort", "layers": {}}}))
    assert plans.load_cached(target, "k") == {"engine": "ort", "layers": {}}


@pytest.mark.parametrize("name, value", [("group", 879381798), ("group", 3), ("strides", [1, 0]),
                                         ("pads", [1, 1, 1, 10 ** 9])])
def test_absurd_conv_attributes_are_refused_at_load(tmp_path: Path, name: str, value) -> None:
    """Found by the fuzz test: a consistent folder with Conv group 879381798 hung `check` (sparse)."""
    from onnx import helper

    target = copy_model_dir("digits-cnn", tmp_path)

    def change(model) -> None:
        node = model.graph.node[2]
        old = next(a for a in node.attribute if a.name == name)
        old.CopyFrom(helper.make_attribute(name, value))
    edit_onnx(target, change)
    edit_manifest(target, lambda m: m["graph"][2]["attributes"].update({name: value}))
    rehash(target)
    for kernels in ("sparse", "ort"):
        assert_one_line_error(cli("check", str(target), "--kernels", kernels, timeout=60), f"has {name}")


def test_overflowing_model_arithmetic_is_one_line(tmp_path: Path) -> None:
    """Found by the fuzz test: Gemm alpha=inf made numpy print RuntimeWarnings above the FAIL line."""
    target = copy_model_dir("digits-mlp", tmp_path)

    def alpha(model) -> None:
        next(a for a in model.graph.node[3].attribute if a.name == "alpha").f = float("inf")
    edit_onnx(target, alpha)
    edit_manifest(target, lambda m: m["graph"][3]["attributes"].update(alpha=float("inf")))
    rehash(target)
    done = cli("check", str(target), "--kernels", "dense")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "differs by nan" in done.stderr
