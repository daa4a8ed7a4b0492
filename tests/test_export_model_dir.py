"""``edgeprune export``: the external layout it writes with ``--layout external`` (formats 1-2: sparse
ONNX + CSR + manifest, loadable by stock onnxruntime), and its refusals. Compact storage (format 3,
the default): tests/test_export_compact.py and tests/test_runtime_compact.py."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest
import torch

from compressor.errors import ExportError
from compressor.export.from_run import pick_level
from compressor.export.model_dir import export_model, sha256_of
from compressor.export.onnx_npz import member_offsets
from tests.runtime_models import make, prune_global

REPO = Path(__file__).resolve().parent.parent


def export(name: str, sparsity: float, out: Path, **options) -> tuple:
    model = prune_global(make(name), sparsity)
    result = export_model(model, out, **{"layout": "external", **options})
    return model, result


def ort_run(model_dir: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_resnet20_model_dir_is_complete_and_matches_torch(tmp_path: Path) -> None:
    model, result = export("resnet20", 0.9, tmp_path / "m")
    out = result.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "weights.npz"]
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("format", "format_version", "input", "outputs", "graph", "layers", "accuracy", "sparsity",
                "files", "sample", "source"):
        assert key in manifest
    assert manifest["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert manifest["files"] == {n: sha256_of(out / n) for n in ("model.onnx", "weights.npz")}
    assert abs(manifest["sparsity"] - 0.9) < 0.005
    # BatchNorm folded into the convs; every conv and the fc is a listed layer
    ops = [node["op_type"] for node in manifest["graph"]]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 21
    assert len(manifest["layers"]) == 22 and "blocks.3.shortcut.0" in {l["name"] for l in manifest["layers"]}
    # stock onnxruntime runs model.onnx as it is, equal to PyTorch on fresh inputs, batch 1 and 4
    for batch in (1, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert np.max(np.abs(ort_run(out, x) - expected)) <= 1e-4
    with np.load(out / "weights.npz", allow_pickle=False) as npz:
        assert np.max(np.abs(ort_run(out, npz["sample.input"]) - npz["sample.output"])) == 0


def test_sparse_layers_are_sparse_initializers_sharing_the_csr_bytes(tmp_path: Path) -> None:
    _, result = export("digits-mlp", 0.9, tmp_path / "m")
    out = result.out_dir
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    manifest = json.loads((out / "manifest.json").read_text())
    csr_layers = {l["weight"] for l in manifest["layers"] if l["storage"] == "csr"}
    assert csr_layers == {s.values.name for s in graph.sparse_initializer} and csr_layers
    offsets = member_offsets(out / "weights.npz")
    with np.load(out / "weights.npz", allow_pickle=False) as npz:
        for sparse in graph.sparse_initializer:
            name = sparse.values.name
            refs = {e.key: e.value for e in sparse.values.external_data}
            assert refs["location"] == "weights.npz"
            assert (int(refs["offset"]), int(refs["length"])) == offsets[f"{name}.data"]  # one copy
            assert sparse.indices.data_type == onnx.TensorProto.INT64
            assert not sparse.indices.external_data  # inline: onnxruntime <= 1.22 cannot read it external
            assert npz[f"{name}.indptr"].dtype == np.int32
            assert npz[f"{name}.data"].dtype == np.float32
            cols = int(np.prod(list(sparse.dims)[1:]))
            assert npz[f"{name}.indices"].dtype == (np.uint8 if cols <= 256 else np.uint16)
            # CSR and coo describe the same non-zeros
            indptr, indices = npz[f"{name}.indptr"], npz[f"{name}.indices"]
            rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
            assert np.array_equal(rows * cols + indices, numpy_helper.to_array(sparse.indices))
        names = set(npz.files)
    # no tensor is stored twice: a CSR layer has no dense copy, a dense one no CSR arrays
    for layer in manifest["layers"]:
        assert (layer["weight"] in names) == (layer["storage"] == "dense")
    with zipfile.ZipFile(out / "weights.npz") as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    # weights and large tensors point into weights.npz; small constants stay inline (shape inference
    # reads them), recorded as such in the manifest
    for tensor in graph.initializer:
        inline = manifest["tensors"][tensor.name]["onnx"] == "inline"
        assert (tensor.data_location != onnx.TensorProto.EXTERNAL) == inline
        assert not inline or (tensor.name not in {l["weight"] for l in manifest["layers"]}
                              and numpy_helper.to_array(tensor).nbytes <= 1024)


def test_storage_rule_and_size(tmp_path: Path) -> None:
    _, dense = export("digits-mlp", 0.0, tmp_path / "dense")
    _, sparse = export("digits-mlp", 0.95, tmp_path / "sparse")
    assert {l["storage"] for l in dense.layers} == {"dense"}
    assert {l["storage"] for l in sparse.layers} == {"csr"}
    assert sparse.size_bytes * 3 < sparse.dense_onnx_bytes  # a tiny model: headers and manifest weigh in
    # dense storage never costs much more than a plain ONNX file (sample + manifest overhead)
    assert dense.size_bytes < dense.dense_onnx_bytes * 1.35


def test_float16_option_halves_values_and_still_runs(tmp_path: Path) -> None:
    model, result = export("digits-mlp", 0.9, tmp_path / "m", values_dtype="float16")
    with np.load(result.out_dir / "weights.npz", allow_pickle=False) as npz:
        for layer in result.layers:
            key = layer["weight"] + (".data" if layer["storage"] == "csr" else "")
            assert npz[key].dtype == np.float16
        assert npz["net.0.bias"].dtype == np.float32  # biases keep full precision
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(ort_run(result.out_dir, x) - expected)) < 0.05


def test_refuses_to_overwrite_without_force_and_keeps_the_old_dir(tmp_path: Path) -> None:
    _, first = export("digits-mlp", 0.5, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in first.out_dir.iterdir()}
    with pytest.raises(ExportError, match="--force"):
        export("digits-mlp", 0.9, tmp_path / "m")
    assert {p.name: p.read_bytes() for p in first.out_dir.iterdir()} == before
    _, second = export("digits-mlp", 0.9, tmp_path / "m", force=True)
    assert json.loads((second.out_dir / "manifest.json").read_text())["sparsity"] > 0.85
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind


def test_pick_level_by_max_drop() -> None:
    from compressor.run.run_dir import LevelInfo

    levels = [LevelInfo("lr-rewind", k, s, a, Path("x")) for k, s, a in
              [(0, 0.0, 0.95), (1, 0.2, 0.96), (2, 0.36, 0.945), (3, 0.49, 0.90)]]
    assert pick_level(levels, None, None, 1.0).level == 2
    assert pick_level(levels, None, None, 10.0).level == 3
    assert pick_level(levels, None, None, None).level == 3
    assert pick_level(levels, "lr-rewind", 1, None).level == 1
    with pytest.raises(ExportError, match="no method"):
        pick_level(levels, "finetune", None, None)
    with pytest.raises(ExportError, match="no finished level 7"):
        pick_level(levels, None, 7, None)
    with pytest.raises(ExportError, match="--max-drop must be >= 0"):
        pick_level(levels, None, None, -1.0)  # would leave no level at all: not a bare ValueError
    regression = [LevelInfo("lr-rewind", k, s, float("nan"), Path("x")) for k, s in [(0, 0.0), (1, 0.2)]]
    with pytest.raises(ExportError, match="needs accuracies"):
        pick_level(regression, None, None, 1.0)  # a run trained with --loss mse has no accuracy to compare


def test_failed_swap_puts_the_previous_model_dir_back(tmp_path: Path, monkeypatch) -> None:
    import os

    from edge_runtime import safe_io

    out, temp = tmp_path / "m", tmp_path / ".m.tmp"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    temp.mkdir()
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == temp:
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(safe_io.os, "replace", failing_replace)
    with pytest.raises(OSError):
        safe_io.replace_dir(temp, out)
    assert (out / "keep.txt").read_text() == "keep"


def edgeprune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_exports_a_real_run_dir_and_a_checkpoint(tmp_path: Path) -> None:
    from tests.compressor_fixtures import run_tiny

    run_dir = tmp_path / "run"
    run_tiny(run_dir)
    done = edgeprune("export", str(run_dir), "--out", str(tmp_path / "md"), "--max-drop", "100")
    assert done.returncode == 0, done.stderr
    assert "exported lr-rewind level 4 (sparsity 55.0%" in done.stdout and "--max-drop" in done.stdout
    default = edgeprune("export", str(run_dir), "--out", str(tmp_path / "last"), "--layout", "external")
    assert "level 4" in default.stdout and "the default" in default.stdout  # the user learns the rule
    assert "larger than the dense ONNX" in default.stderr  # 55%, int64 ONNX indices: CSR does not pay yet
    compact = edgeprune("export", str(run_dir), "--out", str(tmp_path / "compact"))
    assert "format 3" in compact.stdout and "larger" not in compact.stderr  # no int64 copy: it does
    manifest = json.loads((tmp_path / "md" / "manifest.json").read_text())
    assert manifest["source"]["level"] >= 1 and manifest["accuracy"] > 0.1
    assert abs(manifest["sparsity"] - 0.55) < 0.01
    assert manifest["source"]["data"] == "digits"
    with np.load(tmp_path / "md" / "weights.npz", allow_pickle=False) as npz:
        sample = npz["sample.input"]
    assert sample.shape == (1, 64) and len(np.unique(sample)) < 20  # a real digit (0..16 levels), not noise
    # --model + checkpoint: the run's final.pt of level 1
    checkpoint = run_dir / "lr-rewind" / "level_1" / "final.pt"
    done = edgeprune("export", "--model", "digits-mlp", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "ck"))
    assert done.returncode == 0, done.stderr
    assert "smaller than dense ONNX" in done.stdout


@pytest.mark.parametrize("args, needle", [
    (["--out", "OUT/x"], "either a RUN_DIR or --model"),
    (["NOPE", "--out", "OUT/x"], "RUN_DIR not found"),
    (["--model", "nosuch", "--out", "OUT/x"], "unknown model"),
    (["--model", "digits-mlp", "--checkpoint", "NOPE.pt", "--out", "OUT/x"], "checkpoint not found"),
    (["--model", "digits-mlp", "--checkpoint", "JUNK.pt", "--out", "OUT/x"], "not a readable PyTorch checkpoint"),
    (["--model", "digits-mlp", "--out", "OUT/existing"], "--force"),
    (["--model", "digits-mlp", "--out", "OUT/existing/keep.txt/x"], "keep.txt"),  # OSError: not a directory
])
def test_cli_user_errors_are_one_line(tmp_path: Path, args: list, needle: str) -> None:
    (tmp_path / "JUNK.pt").write_bytes(b"garbage" * 10)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("keep")
    args = [a.replace("OUT", str(tmp_path)).replace("NOPE", str(tmp_path / "nope"))
            .replace("JUNK.pt", str(tmp_path / "JUNK.pt")) for a in args]
    done = edgeprune("export", *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and needle in done.stderr, done.stderr
    assert (tmp_path / "existing" / "keep.txt").read_text() == "keep"


def test_untrained_batchnorm_convs_keep_their_own_bias(tmp_path: Path) -> None:
    """Default BatchNorm stats fold to equal (zero) biases, which the exporter de-duplicates through
    Identity nodes; each conv must still get its own initializer so the runtime sees a weight layer."""
    from compressor.train.models import build_model

    result = export_model(build_model("resnet20").eval(), tmp_path / "m", layout="external")
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert "Identity" not in {node["op_type"] for node in manifest["graph"]}
    convs = [node for node in manifest["graph"] if node["op_type"] == "Conv"]
    assert all(node["inputs"][2] in manifest["tensors"] for node in convs)
    from edge_runtime import InferenceSession

    with np.load(result.out_dir / "weights.npz", allow_pickle=False) as npz:
        x, expected = npz["sample.input"], npz["sample.output"]
    got = InferenceSession(result.out_dir, kernels="sparse", threads=1).run(None, {"input": x})[0]
    assert np.max(np.abs(got - expected)) <= 1e-4
