"""Bad MODEL_DIRs and bad inputs: a typed exception from the API, one line and exit 2 from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime import InferenceSession, InputError, ModelDirError
from edge_runtime.model_dir import sha256_of
from tests.runtime_fixtures import copy_model_dir, example_input

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert needle in lines[0]


def edit_manifest(model_dir: Path, change) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_missing_dir_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="no such MODEL_DIR"):
        InferenceSession(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="no manifest.json"):
        InferenceSession(tmp_path)
    assert_one_line_error(cli("check", str(tmp_path / "nope")), "no such MODEL_DIR")


def test_corrupt_manifest(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    (target / "manifest.json").write_text('{"format": "edgeprune-model", ')
    with pytest.raises(ModelDirError, match="corrupt manifest"):
        InferenceSession(target)
    assert_one_line_error(cli("run", str(target), "--input", "x.npy"), "corrupt manifest")


def test_malformed_manifest_is_a_model_dir_error(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, lambda m: m.update(files=["model.onnx"]))
    with pytest.raises(ModelDirError, match="malformed manifest"):
        InferenceSession(target)
    assert_one_line_error(cli("check", str(target)), "malformed manifest")


def test_unknown_format_version(tmp_path: Path) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    edit_manifest(target, lambda m: m.update(format_version=99))
    with pytest.raises(ModelDirError, match="format version 99"):
        InferenceSession(target)
    assert_one_line_error(cli("bench", str(target), "--json"), "format version 99")


@pytest.mark.parametrize("victim", ["weights.npz", "model.onnx"])
def test_sha256_mismatch_and_missing_file(tmp_path: Path, victim: str) -> None:
    target = copy_model_dir("digits-mlp", tmp_path)
    data = bytearray((target / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / victim).write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=f"{victim} fails its sha256"):
        InferenceSession(target)
    assert_one_line_error(cli("check", str(target)), "sha256")
    (target / victim).unlink()
    with pytest.raises(ModelDirError, match=f"{victim} is missing"):
        InferenceSession(target)


def test_truncated_weights_are_reported_even_with_a_matching_hash(tmp_path: Path) -> None:
    """A truncated npz whose manifest hash was (wrongly) updated still fails cleanly when read."""
    target = copy_model_dir("resnet20", tmp_path)
    weights = target / "weights.npz"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    edit_manifest(target, lambda m: m["files"].update({"weights.npz": sha256_of(weights)}))
    for kernels in ("sparse", "dense"):
        with pytest.raises(ModelDirError, match="weights.npz"):
            InferenceSession(target, kernels=kernels)
    assert_one_line_error(cli("run", str(target), "--kernels", "sparse", "--input", "x.npy"), "weights.npz")


def test_wrong_input_shape_dtype_and_name() -> None:
    from tests.runtime_fixtures import model_dir

    session = InferenceSession(model_dir("resnet20"), kernels="sparse")
    x = example_input("resnet20")
    with pytest.raises(InputError, match="shape"):
        session.run(None, {"input": x[:, :2]})
    with pytest.raises(InputError, match="shape"):
        session.run(None, {"input": x[0]})
    with pytest.raises(InputError, match="dtype float64"):
        session.run(None, {"input": x.astype(np.float64)})
    with pytest.raises(InputError, match="'input'"):
        session.run(None, {"x": x})
    with pytest.raises(InputError, match="unknown output"):
        session.run(["logits"], {"input": x})


def test_cli_wrong_input_file(tmp_path: Path) -> None:
    from tests.runtime_fixtures import model_dir

    bad_shape = tmp_path / "bad.npy"
    np.save(bad_shape, np.zeros((1, 3, 8, 8), np.float32))
    assert_one_line_error(cli("run", str(model_dir("resnet20")), "--input", str(bad_shape), "--kernels", "dense"),
                          "shape")
    not_npy = tmp_path / "junk.npy"
    not_npy.write_bytes(b"not numpy")
    assert_one_line_error(cli("run", str(model_dir("resnet20")), "--input", str(not_npy)), "cannot read")
    out = tmp_path / "y.npy"
    out.write_bytes(b"precious")
    assert cli("run", str(model_dir("resnet20")), "--input", str(bad_shape), "--output", str(out)).returncode == 2
    assert out.read_bytes() == b"precious"  # a failed run leaves an existing output alone


def test_cli_bench_counts_and_info_on_an_incomplete_copy(tmp_path: Path) -> None:
    from tests.runtime_fixtures import model_dir

    # --iters 0 --min-seconds 0 would time nothing: refused before loading, not a traceback on no samples.
    assert_one_line_error(cli("bench", str(model_dir("digits-mlp")), "--iters", "0", "--min-seconds", "0",
                              "--kernels", "sparse"), "--iters")
    assert_one_line_error(cli("bench", str(model_dir("digits-mlp")), "--batch", "0"), "--batch")
    target = copy_model_dir("digits-mlp", tmp_path)
    (target / "weights.npz").unlink()
    assert_one_line_error(cli("info", str(target)), "weights.npz")


def test_clip_without_bounds_is_the_identity() -> None:
    from edge_runtime.ops import OPS

    x = np.array([-3.0, 0.5, 7.0], np.float32)
    assert np.array_equal(OPS["Clip"]([x], {}), x)  # numpy < 2.1 refuses np.clip(x, None, None)
    assert np.array_equal(OPS["Clip"]([x, np.float32(0), None], {}), np.array([0, 0.5, 7], np.float32))


@pytest.mark.parametrize("threads", ["100000", "5000", "0", "-3"])
def test_thread_counts_beyond_the_machine_are_one_line(tmp_path: Path, threads: str) -> None:
    """Issue 20: --kernels ort --threads 100000 crashed onnxruntime (SIGSEGV); 5000 hung it for a minute."""
    import os

    from edge_runtime.device import max_threads
    from edge_runtime.errors import EdgeRuntimeError

    target = copy_model_dir("digits-mlp", tmp_path)
    np.save(tmp_path / "x.npy", example_input("digits-mlp")[:1])
    needle = "more than" if int(threads) > 0 else "at least 1"
    for args in (["check", str(target), "--kernels", "ort"], ["tune", str(target)], ["info", str(target)],
                 ["run", str(target), "--input", str(tmp_path / "x.npy")]):
        assert_one_line_error(cli(*args, "--threads", threads), needle)
    with pytest.raises(EdgeRuntimeError, match=needle):  # before anything loads
        InferenceSession(target, kernels="ort", threads=int(threads))
    assert max_threads() == 4 * (os.cpu_count() or 1)
    InferenceSession(target, kernels="ort", threads=max_threads()).close()  # the bound itself is allowed


def test_sweep_threads_are_bounded() -> None:
    from benchmarks.errors import BenchError
    from benchmarks.sweep_plan import MAX_THREADS, parse_threads

    assert parse_threads("1,4") == [1, 4]
    with pytest.raises(BenchError, match="at most"):
        parse_threads(f"1,{MAX_THREADS + 1}")
