"""``edge_runtime.InferenceSession("model.onnx")`` and the CLIs on plain ONNX files exported by torch here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from edge_runtime import InferenceSession
from edge_runtime.errors import ModelDirError, UnsupportedOpError

REPO = Path(__file__).resolve().parent.parent
KERNELS = ("auto", "sparse", "dense", "ort")


class PrunedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 10)
        with torch.no_grad():  # 90% of the first layer pruned: it must load as CSR
            mask = torch.rand_like(self.up.weight) < 0.9
            self.up.weight[mask] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(y.reshape(y.shape[0], -1))


class TwoInTwoOut(nn.Module):
    """A float input and int64 token ids in; a float and an int64 tensor out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(11, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.embed(ids).mean(1) + x), ids * 2 + 1


class WithCumSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.fc(x), 1)


def _export(model: nn.Module, args: tuple, names: List[str], outputs: List[str], path: Path,
            dynamic: bool = True) -> Path:
    axes = {name: {0: "batch"} for name in names + outputs} if dynamic else None
    torch.onnx.export(model.eval(), args, str(path), input_names=names, output_names=outputs,
                      dynamic_axes=axes, dynamo=False, opset_version=17)
    return path


def _feeds(tmp_path: Path) -> Dict[str, Tuple[Path, Dict[str, np.ndarray], nn.Module]]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    made = {}
    mlp, cnn, two, cum = PrunedMLP(), SmallCNN(), TwoInTwoOut(), WithCumSum()
    made["mlp"] = (_export(mlp, (torch.randn(1, 32),), ["x"], ["y"], tmp_path / "mlp.onnx"),
                   {"x": rng.standard_normal((3, 32)).astype(np.float32)}, mlp)
    made["cnn"] = (_export(cnn, (torch.randn(1, 1, 8, 8),), ["x"], ["y"], tmp_path / "cnn.onnx"),
                   {"x": rng.standard_normal((2, 1, 8, 8)).astype(np.float32)}, cnn)
    made["two"] = (_export(two, (torch.randn(2, 6), torch.zeros(2, 5, dtype=torch.long)), ["x", "ids"],
                           ["h", "ids2"], tmp_path / "two.onnx"),
                   {"x": rng.standard_normal((3, 6)).astype(np.float32),
                    "ids": rng.integers(0, 11, (3, 5)).astype(np.int64)}, two)
    made["cum"] = (_export(cum, (torch.randn(1, 6),), ["x"], ["y"], tmp_path / "cum.onnx"),
                   {"x": rng.standard_normal((2, 6)).astype(np.float32)}, cum)
    return made


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    return _feeds(tmp_path_factory.mktemp("plain_onnx"))


def _torch_outputs(model: nn.Module, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
    with torch.no_grad():
        out = model(*(torch.from_numpy(v) for v in feed.values()))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("name", ["mlp", "cnn", "two"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_outputs_match_pytorch_with_every_engine(models, name: str, kernels: str) -> None:
    path, feed, model = models[name]
    session = InferenceSession(path, kernels=kernels, threads=1)
    got = session.run(None, feed)
    expected = _torch_outputs(model, feed)
    assert [o.name for o in session.get_outputs()] == session.manifest["outputs"]
    assert len(got) == len(expected)
    for value, reference in zip(got, expected):
        assert value.dtype == reference.dtype and value.shape == reference.shape
        assert np.max(np.abs(value.astype(np.float64) - reference)) <= 1e-4
    if kernels in ("sparse", "dense"):
        assert session.engine == "native"
    if kernels == "ort":
        assert session.engine == "ort"


def test_sparse_weights_become_csr_and_the_rest_stays_dense(models) -> None:
    session = InferenceSession(models["mlp"][0], kernels="dense", threads=1)
    storage = {name: info["storage"] for name, info in session.manifest["tensors"].items()}
    assert storage["up.weight"] == "csr" and storage["down.weight"] == "dense"


def test_dtypes_and_several_inputs_are_declared(models) -> None:
    session = InferenceSession(models["two"][0], kernels="dense", threads=1)
    assert [(a.name, a.type) for a in session.get_inputs()] == [("x", "tensor(float)"), ("ids", "tensor(int64)")]
    assert [(a.name, a.type) for a in session.get_outputs()] == [("h", "tensor(float)"), ("ids2", "tensor(int64)")]
    assert session.get_inputs()[0].shape == ["batch", 6]
    h, = session.run(["h"], models["two"][1])
    assert h.dtype == np.float32


def test_an_unknown_op_runs_in_onnxruntime_under_auto(models) -> None:
    path, feed, model = models["cum"]
    session = InferenceSession(path, kernels="auto", threads=1)
    assert session.engine == "ort" and "CumSum" in session.plan.get("reason", "")
    y, = session.run(None, feed)
    assert np.max(np.abs(y - _torch_outputs(model, feed)[0])) <= 1e-4
    for kernels in ("sparse", "dense"):
        with pytest.raises(UnsupportedOpError, match="CumSum"):
            InferenceSession(path, kernels=kernels, threads=1)


def test_broken_files_are_refused(tmp_path: Path, models) -> None:
    data = models["mlp"][0].read_bytes()
    for name, content in (("truncated.onnx", data[: len(data) // 2]), ("garbage.onnx", bytes(range(256)) * 8),
                          ("empty.onnx", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelDirError):
            InferenceSession(tmp_path / name, kernels="auto", threads=1)
    (tmp_path / "link.onnx").symlink_to(models["mlp"][0])
    with pytest.raises(ModelDirError, match="regular file"):
        InferenceSession(tmp_path / "link.onnx", threads=1)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_cli_run_prints_and_saves(tmp_path: Path, models) -> None:
    path, feed, model = models["mlp"]
    np.save(tmp_path / "x.npy", feed["x"])
    done = cli("run", str(path), "--input", str(tmp_path / "x.npy"), "--print", "--kernels", "sparse")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("y: shape [3, 10] float32")
    path, feed, model = models["two"]
    np.save(tmp_path / "xf.npy", feed["x"])
    np.save(tmp_path / "ids.npy", feed["ids"])
    done = cli("run", str(path), "--input", f"x={tmp_path / 'xf.npy'}", "--input", f"ids={tmp_path / 'ids.npy'}",
               "--out", str(tmp_path / "out.npz"), "--threads", "1")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as saved:
        for name, reference in zip(("h", "ids2"), _torch_outputs(model, feed)):
            assert saved[name].dtype == reference.dtype
            assert np.max(np.abs(saved[name] - reference)) <= 1e-4
    done = cli("run", str(path), "--input", str(tmp_path / "xf.npy"))
    assert done.returncode == 2 and "NAME=FILE" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_info_check_tune_bench(models) -> None:
    path = str(models["mlp"][0])
    done = cli("info", path)
    assert done.returncode == 0 and "csr" in done.stdout and "dense" in done.stdout, done.stderr
    done = cli("check", path, "--kernels", "sparse", "--threads", "1")
    assert done.returncode == 0 and done.stdout.startswith("ok ") and "matches onnxruntime" in done.stdout, done.stderr
    done = cli("tune", path, "--threads", "1")
    assert done.returncode == 0 and "not cached" in done.stdout, done.stderr
    done = cli("bench", str(models["two"][0]), "--iters", "3", "--min-seconds", "0", "--threads", "1",
               "--kernels", "dense")
    assert done.returncode == 0 and "engine native" in done.stdout, done.stderr


def test_cli_errors_are_one_line(tmp_path: Path, models) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 6), np.float32))
    data = models["mlp"][0].read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[:100])
    (tmp_path / "junk.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    for args in (("run", str(tmp_path / "cut.onnx"), "--input", str(tmp_path / "x.npy")),
                 ("run", str(tmp_path / "junk.onnx"), "--input", str(tmp_path / "x.npy")),
                 ("info", str(tmp_path / "junk.onnx")),
                 ("run", str(models["cum"][0]), "--kernels", "sparse", "--input", str(tmp_path / "x.npy"))):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "CumSum" in done.stderr


def test_sparse_initializer_and_an_input_without_a_shape(tmp_path: Path) -> None:
    """A hand-made file: a MatMul weight stored as a sparse initializer (COO, linear indices) and a
    graph input that declares no shape; native and onnxruntime agree."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 5)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.85] = 0.0
    flat = np.flatnonzero(weight)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(weight.reshape(-1)[flat], "w"),
                                       numpy_helper.from_array(flat.astype(np.int64), "w_indices"), [8, 5])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "sparse.onnx"))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    session = InferenceSession(tmp_path / "sparse.onnx", kernels="sparse", threads=1)
    assert session.manifest["tensors"]["w"]["storage"] == "csr"
    y, = session.run(None, {"x": x})
    assert np.max(np.abs(y - x @ weight)) <= 1e-5
    y_ort, = InferenceSession(tmp_path / "sparse.onnx", kernels="ort", threads=1).run(None, {"x": x})
    assert np.max(np.abs(y - y_ort)) <= 1e-5


def test_mutated_files_fail_only_with_runtime_errors(tmp_path: Path, models) -> None:
    """Seeded byte flips in a real export: each load (and run) works or raises one of the runtime's own
    errors, never numpy's, onnxruntime's or the parser's raw exceptions."""
    from edge_runtime.bench import random_feed
    from edge_runtime.errors import EdgeRuntimeError

    rng = np.random.default_rng(7)
    data = models["two"][0].read_bytes()
    outcomes = set()
    for index in range(60):
        mutant = bytearray(data)
        for position in rng.integers(0, len(mutant), size=rng.integers(1, 4)):
            mutant[position] = int(rng.integers(0, 256))
        path = tmp_path / f"mutant{index}.onnx"
        path.write_bytes(bytes(mutant))
        try:
            session = InferenceSession(path, kernels="dense", threads=1)
            session.run(None, random_feed(session.get_inputs(), 1, 0))  # sizes checked before allocating
            outcomes.add("ran")
        except EdgeRuntimeError as error:
            outcomes.add(type(error).__name__)
    assert "ModelDirError" in outcomes
