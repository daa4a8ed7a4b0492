"""Constant-driven allocations stay within EDGEPRUNE_MAX_MODEL_BYTES (issue 20): a 155-byte ONNX file
asking ConstantOfShape for 3.2 GB, and a MODEL_DIR whose hashes all check with one constant edited, are
refused in one line at load, for every engine; sizes that depend on input values are refused while
running, before the op allocates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime import InferenceSession, ModelDirError
from edge_runtime.allocation import estimate
from edge_runtime.ops import OPS
from edge_runtime.ops.base import Attrs
from tests.hostile_model_dirs import REPO, assert_one_line_error, edit_onnx, rewrite_npz

LIMIT = str(1 << 20)
HUGE = 805306368  # float32: 3.2 GB


def _plain(path: Path, nodes: list, initializers: dict, inputs: list, outputs: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _bomb(tmp_path: Path) -> Path:
    """ConstantOfShape([805306368]) → ReduceSum → + x: a few hundred bytes that ask for 3.2 GB."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0), helper.make_node("Add", ["s", "x"], ["y"])]
    return _plain(tmp_path / "bomb.onnx", nodes, {"shape": np.array([HUGE], np.int64)},
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])


def _measured(*args: str) -> subprocess.CompletedProcess:
    """``edge-runtime ARGS`` under a 1 MiB model limit; stdout's last line is the process's peak RSS (KiB)."""
    # VmHWM, not ru_maxrss: Linux carries the forking parent's high-water mark into a child's ru_maxrss
    # across exec (a long pytest process read 1.8 GB there); VmHWM belongs to the child's own memory map
    script = ("import sys; from edge_runtime.cli import main; rc = main(sys.argv[1:]); "
              "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))); "
              "sys.exit(rc)")
    env = {**os.environ, "EDGEPRUNE_MAX_MODEL_BYTES": LIMIT, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)


def _assert_refused_small(done: subprocess.CompletedProcess, needle: str) -> None:
    assert_one_line_error(done, needle)
    assert "EDGEPRUNE_MAX_MODEL_BYTES" in done.stderr
    assert int(done.stdout.split()[-1]) < 600_000, done.stdout  # KiB: numpy + onnxruntime, never the 3.2 GB


def test_a_tiny_onnx_file_cannot_allocate_gigabytes(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path)
    assert bomb.stat().st_size < 200
    for kernels in ("sparse", "auto", "ort", "dense"):  # before: 3.36 GB in check --kernels sparse
        _assert_refused_small(_measured("check", str(bomb), "--kernels", kernels), "ConstantOfShape")


def test_a_broadcast_of_two_small_constants_is_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["big"]), helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["s", "x"], ["y"])]
    path = _plain(tmp_path / "outer.onnx", nodes, {"a": np.ones((600, 1), np.float32),
                                                   "b": np.ones((1, 600), np.float32)},
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    _assert_refused_small(_measured("check", str(path), "--kernels", "sparse"), "(Add)")


def test_sizes_from_input_values_are_refused_before_the_op_runs(tmp_path: Path, monkeypatch) -> None:
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("ConstantOfShape", ["n"], ["big"], value=one),
             helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)]
    path = _plain(tmp_path / "dynamic.onnx", nodes, {}, [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    monkeypatch.setenv("EDGEPRUNE_MAX_MODEL_BYTES", LIMIT)
    session = InferenceSession(path, kernels="sparse")
    assert session.run(None, {"n": np.array([1000], np.int64)})[0] == 1000.0
    with pytest.raises(ModelDirError, match="while running.*EDGEPRUNE_MAX_MODEL_BYTES"):
        session.run(None, {"n": np.array([HUGE], np.int64)})


def _ones_model_dir(tmp_path: Path) -> Path:
    """A MODEL_DIR of ``fc(x) + torch.ones(batch, 1000)``: Shape → Gather → Concat([batch, 1000]) →
    ConstantOfShape, the 1000 an inline int64 constant (kept in model.onnx and weights.npz alike)."""
    import torch
    from torch import nn

    from compressor.export.model_dir import export_model

    class Ones(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.fc(x) + torch.ones(x.shape[0], 1000)).mean(1, keepdim=True)

    torch.manual_seed(0)
    target = tmp_path / "ones"
    export_model(Ones().eval(), target, input_shape=(16,), force=True, layout="external")
    return target


def test_a_model_dir_with_an_edited_constant_and_valid_hashes_is_refused(tmp_path: Path) -> None:
    target = _ones_model_dir(tmp_path)
    assert _measured("check", str(target), "--kernels", "sparse").returncode == 0  # fits the 1 MiB limit as built
    manifest = json.loads((target / "manifest.json").read_text())
    name = next(n for node in manifest["graph"] if node["op_type"] == "Concat" for n in node["inputs"]
                if n in manifest["tensors"])  # the 1000 of torch.ones(batch, 1000)
    edited = np.array([HUGE], np.int64)
    rewrite_npz(target, lambda arrays: arrays.__setitem__(name, edited))  # rehashes

    def inline(model) -> None:
        tensor = next(t for t in model.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array(edited, name))
    edit_onnx(target, inline)  # rehashes
    for kernels in ("sparse", "auto", "ort"):  # before: 3.2 GB (sparse), 6.5 GB (auto)
        _assert_refused_small(_measured("check", str(target), "--kernels", kernels), "ConstantOfShape")


# -- the estimates agree with what the ops make ---------------------------------------------------------
F = np.float32
CASES = [
    ("ConstantOfShape", [np.array([3, 4], np.int64)], {}),
    ("Expand", [np.ones((3, 1), F), np.array([2, 1, 5], np.int64)], {}),
    ("Tile", [np.ones((2, 3), F), np.array([4, 2], np.int64)], {}),
    ("Range", [np.array(2, np.int64), np.array(40, np.int64), np.array(3, np.int64)], {}),
    ("OneHot", [np.array([[1, 2]], np.int64), np.array(7, np.int64), np.array([0, 1], F)], {}),
    ("TopK", [np.ones((3, 9), F), np.array([4], np.int64)], {}),
    ("Pad", [np.ones((2, 3), F), np.array([1, 2, 3, 4], np.int64)], {}),
    ("Pad", [np.ones((2, 3), F), np.array([-1, 2, 0, 1], np.int64)], {}),
    ("Resize", [np.ones((1, 1, 3, 4), F), None, np.array([1, 1, 2, 2.5], F)], {}),
    ("Resize", [np.ones((1, 1, 3, 4), F), None, None, np.array([1, 1, 7, 5], np.int64)], {}),
    ("Gather", [np.ones((5, 6, 7), F), np.zeros((2, 3), np.int64)], {"axis": 1}),
    ("Concat", [np.ones((2, 3), F)] * 5, {"axis": 1}),
    ("MatMul", [np.ones((4, 1, 2, 3), F), np.ones((5, 3, 6), F)], {}),
    ("Gemm", [np.ones((3, 2), F), np.ones((4, 3), F)], {"transA": 1, "transB": 1}),
    ("Einsum", [np.ones(3, F), np.ones(4, F)], {"equation": "i,j->ij"}),
    ("Add", [np.ones((6, 1), F), np.ones((1, 7), F)], {}),
    ("Where", [np.ones((6, 1), bool), np.ones((1, 7), F), np.ones(1, F)], {}),
    ("Conv", [np.ones((2, 3, 9, 8), F), np.ones((4, 3, 3, 2), F)], {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ("MaxPool", [np.ones((1, 2, 9, 9), F)], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 0}),
    ("ConvTranspose", [np.ones((1, 2, 4, 5), F), np.ones((2, 3, 3, 3), F)], {"strides": [2, 3]}),
]


@pytest.mark.parametrize("op, inputs, attributes", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_estimates_match_the_real_output(op: str, inputs: list, attributes: dict) -> None:
    attrs = Attrs(attributes, op, 17, 2 if op == "TopK" else 1)
    shapes = [None if v is None else v.shape for v in inputs]
    shape, nbytes = estimate(op, shapes, inputs, attrs, [None if v is None else v.dtype for v in inputs])
    out = OPS[op](inputs, attrs)
    out = out[0] if isinstance(out, tuple) else out
    assert shape == out.shape and nbytes >= out.nbytes


def test_a_float_shape_is_read_as_the_op_reads_it() -> None:
    """The ops take int() of each value: a float shape tensor must be sized the same way, not skipped."""
    shape, nbytes = estimate("ConstantOfShape", [(1,)], [np.array([HUGE], np.float32)], Attrs({}, "ConstantOfShape"))
    assert shape == (HUGE,) and nbytes == 4 * HUGE
