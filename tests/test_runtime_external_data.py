"""Plain ONNX files whose weights are external data beside them (``model.onnx.data``, what torch's
default exporter and ``onnx.save_model(save_as_external_data=True)`` write): loaded as onnxruntime
loads them, and every hostile location, link, file kind, offset and length refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the files are written with the onnx package (not in the pinned venv)")
ort = pytest.importorskip("onnxruntime")

from edge_runtime import InferenceSession  # noqa: E402
from edge_runtime.errors import ModelDirError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KERNELS = ("auto", "sparse", "dense", "ort")


def _model():
    """x [N, 16] → MatMul (a 90%-zero weight: CSR natively) → Add → Relu → Gemm → y [N, 4]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w1[rng.random(w1.shape) < 0.9] = 0.0
    tensors = {"w1": w1, "b1": rng.standard_normal(32).astype(np.float32),
               "w2": rng.standard_normal((4, 32)).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [numpy_helper.from_array(a, name) for name, a in tensors.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save_external(folder: Path, name: str = "model.onnx") -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_model(), str(folder / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.data", size_threshold=0)
    return folder / name


def _edit(path: Path, change: Callable) -> Path:
    """Rewrite ``path``'s protobuf (its external data left as it is) after ``change(first initializer)``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    change(model.graph.initializer[0])
    path.write_bytes(model.SerializeToString())
    return path


def _set(key: str, value: str) -> Callable:
    def change(tensor) -> None:
        entry = next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add()
        entry.key, entry.value = key, value
    return change


def _feed() -> Dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)}


def test_the_file_really_has_external_data(tmp_path: Path) -> None:
    import onnx

    path = _save_external(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert (tmp_path / "model.onnx.data").stat().st_size > path.stat().st_size


@pytest.mark.parametrize("kernels", KERNELS)
def test_external_data_loads_as_onnxruntime_loads_it(tmp_path: Path, kernels: str) -> None:
    path = _save_external(tmp_path)
    reference, = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, _feed())
    session = InferenceSession(path, kernels=kernels, threads=1)
    got, = session.run(None, _feed())
    assert np.max(np.abs(got - reference)) <= 1e-5
    if kernels == "sparse":
        assert session.manifest["tensors"]["w1"]["storage"] == "csr"


def test_onnxruntime_is_fed_the_checked_arrays_and_never_opens_the_data_file(tmp_path: Path) -> None:
    """kernels=ort: the runtime reads model.onnx.data itself and hands onnxruntime the arrays, so the
    file may go (or change) after load without onnxruntime ever seeing it."""
    path = _save_external(tmp_path)
    reference, = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, _feed())
    session = InferenceSession(path, kernels="ort", threads=1)
    (tmp_path / "model.onnx.data").unlink()
    got, = session.run(None, _feed())
    assert np.max(np.abs(got - reference)) <= 1e-5


def _hostile(tmp_path: Path, case: str) -> Path:
    """One hostile variant of a real external-data file (see the parametrize ids)."""
    path = _save_external(tmp_path / case)
    folder = path.parent
    if case == "parent":
        os.replace(folder / "model.onnx.data", tmp_path / "outside.data")
        return _edit(path, _set("location", "../outside.data"))
    if case == "absolute":
        return _edit(path, _set("location", str(folder / "model.onnx.data")))
    if case == "subfolder":
        (folder / "sub").mkdir()
        os.replace(folder / "model.onnx.data", folder / "sub" / "w.data")
        return _edit(path, _set("location", "sub/w.data"))
    if case == "symlink":
        os.replace(folder / "model.onnx.data", tmp_path / "real.data")
        (folder / "model.onnx.data").symlink_to(tmp_path / "real.data")
        return path
    if case == "fifo":
        (folder / "model.onnx.data").unlink()
        os.mkfifo(folder / "model.onnx.data")  # opening it for reading would block without a writer
        return path
    if case == "missing":
        (folder / "model.onnx.data").unlink()
        return path
    if case == "offset_past_end":
        return _edit(path, _set("offset", str((folder / "model.onnx.data").stat().st_size)))
    if case == "negative_offset":
        return _edit(path, _set("offset", "-64"))
    if case == "huge_length":
        return _edit(path, _set("length", str(1 << 62)))
    if case == "huge_shape":  # its declared bytes alone exceed the size limit: refused before any read
        return _edit(path, lambda t: t.dims.extend([1 << 20, 1 << 20]))
    if case == "unknown_key":
        return _edit(path, _set("basepath", "/etc"))
    raise AssertionError(case)


HOSTILE = {"parent": "only a file beside the model", "absolute": "only a file beside the model",
           "subfolder": "only a file beside the model", "symlink": "symlinks are refused|not a regular file",
           "fifo": "not a regular file", "missing": "is missing", "offset_past_end": "run past the end",
           "negative_offset": "not a non-negative decimal", "huge_length": "is not the 2,048 bytes of its shape",
           "huge_shape": "EDGEPRUNE_MAX_MODEL_BYTES", "unknown_key": "external_data keys"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_external_data_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    path = _hostile(tmp_path, case)
    for kernels in ("ort", "dense"):
        with pytest.raises(ModelDirError, match=HOSTILE[case]) as raised:
            InferenceSession(path, kernels=kernels, threads=1)
        assert "\n" not in str(raised.value) and str(path) in str(raised.value)


def test_the_cli_refuses_a_hostile_file_in_one_line(tmp_path: Path) -> None:
    path = _hostile(tmp_path, "parent")
    done = subprocess.run([sys.executable, "-m", "edge_runtime", "info", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "only a file beside the model" in done.stderr and "Traceback" not in done.stderr


def test_model_bytes_cannot_name_external_data(tmp_path: Path) -> None:
    path = _save_external(tmp_path)
    with pytest.raises(ModelDirError, match="model bytes cannot carry"):
        InferenceSession(path.read_bytes(), kernels="ort", threads=1)


def test_a_file_from_torchs_default_dynamo_exporter(tmp_path: Path) -> None:
    """torch.onnx.export(dynamo=True), the default since torch 2.9, with its weights in model.onnx.data."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript")

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.randn(2, 16),), str(path), dynamo=True, external_data=True)
    assert (tmp_path / "model.onnx.data").exists()
    x = _feed()["x"][:2]
    stock = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference, = stock.run(None, {stock.get_inputs()[0].name: x})
    session = InferenceSession(path, kernels="auto", threads=1)
    got, = session.run(None, {session.get_inputs()[0].name: x})
    assert np.max(np.abs(got - reference)) <= 1e-5
