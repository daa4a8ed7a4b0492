"""Fuzz the MODEL_DIR reader and the runtime's load + run path (issue 9), plain ONNX files and the
plans.json cache (issue 20).

Each example starts from a valid MODEL_DIR written by the real export, mutates its manifest JSON, the
bytes or arrays of weights.npz, or the bytes of model.onnx, usually makes every sha256 valid again (as
an attacker would), and runs ``edge-runtime check`` on it in a worker process under an address-space
limit (``tests/fuzz_worker.py``). Every outcome must be success, a sample mismatch (exit 1) or one line
and exit 2: never an exception escaping the CLI, never a crash of the worker.

Plain ONNX files (written by ``to-onnx`` from the fixtures, plus a graph whose int64 constants size
ConstantOfShape, Tile, Range, Pad, Expand, TopK and OneHot) get their bytes, initializers, attributes and
wiring mutated. plans.json in a tuned MODEL_DIR gets its JSON or bytes mutated, or is replaced by a FIFO, a
link to /dev/zero or outside, an oversized file or a folder; ``check --kernels auto`` must then ignore it
(and never write through a link: a victim file outside must keep its bytes).

CI runs a fixed, small number of examples (~10 s). Longer runs (EXAMPLES for MODEL_DIRs; plain files get
2/5 of that, plans.json 1/10)::

    EDGEPRUNE_FUZZ_EXAMPLES=5000 EDGEPRUNE_FUZZ_REPORT=fuzz.json python -m pytest tests/test_runtime_fuzz.py
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edge_runtime.npz_reader import NpzArchive
from tests.hostile_model_dirs import REPO, rehash
from tests.runtime_fixtures import model_dir

LONG_RUN = "EDGEPRUNE_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("EDGEPRUNE_FUZZ_EXAMPLES", "200"))  # CI: 200 + 80 + 20 examples, ~10 s idle
PLAIN_EXAMPLES = max(EXAMPLES * 2 // 5, 1)
PLANS_EXAMPLES = max(EXAMPLES // 10, 1)
ADDRESS_SPACE = 3 << 30          # the worker's RLIMIT_AS: numpy + scipy + onnxruntime reserve ~2.3 GB
MODEL_LIMIT = str(256 << 20)     # EDGEPRUNE_MAX_MODEL_BYTES inside the worker
MODELS = ("digits-mlp", "digits-cnn", "digits-mlp-int8-compact", "digits-cnn-int8-compact")  # formats 1 and 3
HANG_SECONDS = 30                # one `check` of these tiny models takes well under a second
# CI: a fixed set of examples (derandomized). Long runs: random, and no shrinking (a hang or crash
# would be replayed for many minutes); the failing example's draws are printed as found.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + ([] if LONG_RUN else [Phase.shrink])
settings.register_profile("fuzz", max_examples=EXAMPLES, deadline=None, derandomize=not LONG_RUN,
                          suppress_health_check=list(HealthCheck), print_blob=True, phases=PHASES)

STATS: Counter = Counter()


class Worker:
    """The child that runs `check`; restarted after a crash (which is recorded)."""

    def __init__(self) -> None:
        self.process: Optional[subprocess.Popen] = None
        self.peak_rss_mb = 0.0
        self.home = tempfile.mkdtemp(prefix="edgeprune-fuzz-home-")  # plans refused by MODEL_DIR go here
        atexit.register(shutil.rmtree, self.home, ignore_errors=True)

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "EDGEPRUNE_MAX_MODEL_BYTES": MODEL_LIMIT, "PYTHONPATH": str(REPO),
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HOME": self.home}
        process = subprocess.Popen([sys.executable, "-m", "tests.fuzz_worker", str(ADDRESS_SPACE)], cwd=REPO,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert json.loads(process.stdout.readline()) == {"ready": True}
        return process

    def run(self, folder: Path, kernels: str) -> Dict[str, Any]:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        self.process.stdin.write(json.dumps({"dir": str(folder), "kernels": kernels}) + "\n")
        self.process.stdin.flush()
        if not select.select([self.process.stdout], [], [], HANG_SECONDS)[0]:  # a hang is a failure too
            self.process.kill()
            self.process.wait()
            self.process = None
            return {"hang": HANG_SECONDS}
        line = self.process.stdout.readline()
        if not line:  # the worker died: a crash of the runtime (signal) or of the interpreter
            code = self.process.wait()
            self.process = None
            return {"crash": code}
        return json.loads(line)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            for line in self.process.stdout:
                self.peak_rss_mb = max(self.peak_rss_mb, json.loads(line).get("peak_rss_mb", 0.0))
            self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        """Stop (keeping the peak RSS seen) so the next run starts a fresh worker."""
        self.stop()


@pytest.fixture(scope="module")
def worker():
    the_worker = Worker()
    yield the_worker
    the_worker.stop()
    STATS["peak_rss_mb"] = the_worker.peak_rss_mb
    report = os.environ.get("EDGEPRUNE_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(STATS), indent=1))
    print(f"\nfuzz: {dict(STATS)}")


@pytest.fixture(scope="module")
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="edgeprune-fuzz-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# -- mutations ------------------------------------------------------------------------------------------
HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["../x", "/etc/passwd", "csr", "dense", "float16", "int64", "batch", "model.onnx"]),
    st.lists(st.integers(-2, 10 ** 10), max_size=4), st.just({}), st.just([]),
)


def _mutate_json(draw, node: Any, depth: int = 0) -> Any:
    """Walk into the manifest at random and replace, delete or keep-and-descend (never the whole
    manifest or its format name: those are refused at once and would teach the fuzzer nothing)."""
    if isinstance(node, dict) and node and (depth == 0 or draw(st.integers(0, 4))):
        key = draw(st.sampled_from(sorted(k for k in node if depth or k != "format") or sorted(node)))
        if draw(st.integers(0, 7)) == 0:
            del node[key]
        else:
            node[key] = _mutate_json(draw, node[key], depth + 1)
        return node
    if isinstance(node, list) and node and draw(st.integers(0, 4)):
        index = draw(st.integers(0, len(node) - 1))
        node[index] = _mutate_json(draw, node[index], depth + 1)
        return node
    return draw(HOSTILE_VALUES)


def _mutate_npz_member(draw, path: Path) -> None:
    """Overwrite one element of one array in place (offsets stay valid, so deeper checks are reached)."""
    archive = NpzArchive(path, 1 << 30)
    try:
        members = {k: m for k, m in archive.members.items() if m.nbytes}
    finally:
        archive.close()
    key = draw(st.sampled_from(sorted(members)))
    member = members[key]
    index = draw(st.integers(0, member.nbytes // member.dtype.itemsize - 1))
    if member.dtype.kind == "f":
        value = draw(st.floats(width=16 if member.dtype.itemsize == 2 else 32, allow_nan=True))
    else:
        info = np.iinfo(member.dtype)
        value = draw(st.one_of(st.integers(int(info.min), int(info.max)), st.sampled_from([0, 1, -1, 2 ** 31 - 1])
                               .filter(lambda v: info.min <= v <= info.max)))
    raw = np.array([value], dtype=member.dtype).tobytes()
    with open(path, "r+b") as handle:
        handle.seek(member.offset + index * member.dtype.itemsize)
        handle.write(raw)


def _mutate_bytes(draw, path: Path) -> None:
    data = bytearray(path.read_bytes())
    kind = draw(st.sampled_from(["overwrite", "overwrite", "truncate", "insert"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    else:
        patch = draw(st.binary(min_size=1, max_size=8))
        data[at:at + len(patch)] = patch
    path.write_bytes(bytes(data))


def _mutate_attribute(draw, target: Path) -> None:
    """Change one node attribute the same way in model.onnx and the manifest: a consistent folder whose
    graph is hostile, so the load + run path itself (not the consistency checks) meets the values."""
    import onnx
    from onnx import helper

    model = onnx.load(str(target / "model.onnx"), load_external_data=False)
    manifest = json.loads((target / "manifest.json").read_text())
    casts = len(model.graph.node) - len(manifest["graph"])
    choices = [(i, a.name) for i, n in enumerate(manifest["graph"]) for a in model.graph.node[i + casts].attribute
               if a.type in (1, 2, 7)]
    index, name = draw(st.sampled_from(choices))
    proto = next(a for a in model.graph.node[index + casts].attribute if a.name == name)
    if proto.type == 1:
        value = draw(st.floats(width=32))
    elif proto.type == 2:
        value = draw(st.one_of(st.integers(-4, 8), st.integers(-2 ** 63, 2 ** 63 - 1)))
    else:
        value = draw(st.lists(st.one_of(st.integers(-3, 6), st.integers(-2 ** 40, 2 ** 40)), max_size=6))
    proto.CopyFrom(helper.make_attribute(name, value, attr_type=proto.type))
    manifest["graph"][index]["attributes"][name] = helper.get_attribute_value(proto)
    (target / "model.onnx").write_bytes(model.SerializeToString())
    (target / "manifest.json").write_text(json.dumps(manifest))


def build_case(draw, scratch: Path, counter: list) -> Path:
    """A mutated copy of a fixture MODEL_DIR in ``scratch``."""
    counter[0] += 1
    target = scratch / f"case{counter[0]}"
    shutil.copytree(model_dir(draw(st.sampled_from(MODELS))), target, ignore=shutil.ignore_patterns("plans.json"))
    if draw(st.integers(0, 2)) == 0:  # on the pristine copy, so that both files still parse
        _mutate_attribute(draw, target)
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["manifest", "manifest", "npz-member", "npz-member", "npz-bytes",
                                      "onnx-bytes", "onnx-bytes"]))
        if where == "manifest":
            path = target / "manifest.json"
            path.write_text(json.dumps(_mutate_json(draw, json.loads(path.read_text()))))
        elif where == "npz-member":
            try:
                _mutate_npz_member(draw, target / "weights.npz")
            except Exception:  # an earlier byte mutation broke the archive: mutate bytes instead
                _mutate_bytes(draw, target / "weights.npz")
        else:
            onnx_files = ["model.onnx"] + (["model.int8.onnx"] if (target / "model.int8.onnx").exists() else [])
            _mutate_bytes(draw, target / ("weights.npz" if where == "npz-bytes" else draw(st.sampled_from(onnx_files))))
    if draw(st.integers(0, 4)):  # mostly: hashes made valid again, as an attacker would
        try:
            rehash(target)
        except (ValueError, OSError, AttributeError, TypeError):
            pass  # the manifest is no longer JSON (or not an object): nothing to rehash
    return target


@settings.get_profile("fuzz")
@given(data=st.data())
def test_mutated_model_dirs_end_cleanly(worker, scratch, data) -> None:
    counter = getattr(test_mutated_model_dirs_end_cleanly, "_counter", [0])
    test_mutated_model_dirs_end_cleanly._counter = counter
    target = build_case(data.draw, scratch, counter)
    kernels = data.draw(st.sampled_from(["sparse", "dense", "ort", "ort-int8"]))
    try:
        outcome = worker.run(target, kernels)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    _assert_clean(outcome, "model-dir")


def _assert_clean(outcome: Dict[str, Any], kind: str) -> None:
    """Success, a sample mismatch (exit 1) or one line + exit 2; never a crash, a hang or a traceback."""
    STATS["inputs"] += 1
    STATS[f"inputs: {kind}"] += 1
    assert "crash" not in outcome, f"the runtime crashed (exit {outcome.get('crash')})"
    assert "hang" not in outcome, f"no answer within {HANG_SECONDS} s"
    assert "exception" not in outcome, outcome.get("traceback")
    rc, stderr = outcome["rc"], outcome["stderr"]
    STATS[f"exit {rc}"] += 1
    if "out of memory" in stderr:
        STATS["out of memory (one line)"] += 1
    assert rc in (0, 1, 2), outcome
    if rc in (1, 2):  # a sample mismatch or a refusal: one line either way
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    if rc == 2:
        STATS[f"refused: {_reason(stderr)}"] += 1


REASONS = ("sha256", "not valid JSON", "malformed manifest", "format version", "invalid CSR", "model.onnx",
           "weights.npz", "EDGEPRUNE_MAX_MODEL_BYTES", "failed while running", "cannot be loaded", "not supported",
           "out of memory", "input", "ONNX", "onnxruntime")


def _reason(stderr: str) -> str:
    """A coarse label of what refused the folder: shows how deep the mutations reach."""
    reason = next((reason for reason in REASONS if reason in stderr), "other")
    if reason == "other" and os.environ.get("EDGEPRUNE_FUZZ_VERBOSE"):
        print(stderr.strip())
    return reason


# -- plain ONNX files -----------------------------------------------------------------------------------
PLAIN_SOURCES = ("digits-mlp", "digits-cnn", "mobile-cnn")
HOSTILE_INTS = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, 805306368, 2 ** 31 - 1, 2 ** 40, -2 ** 63,
                                                                  2 ** 63 - 1]), st.integers(-2 ** 63, 2 ** 63 - 1))


def shapes_graph():
    """A small graph whose int64 constants size its tensors (what a constant-driven memory bomb edits):
    Shape → Gather → Concat → ConstantOfShape, Tile, Range, Reshape, Pad, Expand, TopK, OneHot."""
    from onnx import TensorProto, helper, numpy_helper

    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    constants = {"zero": i64(0), "axes0": i64(0), "eight": i64(8), "reps": i64(1, 2), "start": np.array(0, np.float32),
                 "limit": np.array(16, np.float32), "delta": np.array(1, np.float32), "flat": i64(-1, 16),
                 "pads": i64(0, 1, 0, 1), "wide": i64(1, 18), "k": i64(4), "ind": i64(1, 2), "depth": i64(5),
                 "onoff": np.array([0, 1], np.float32)}
    node = helper.make_node
    nodes = [node("Shape", ["x"], ["s"]), node("Gather", ["s", "zero"], ["b"]), node("Unsqueeze", ["b", "axes0"], ["b1"]),
             node("Unsqueeze", ["eight", "axes0"], ["e1"]), node("Concat", ["b1", "e1"], ["shp"], axis=0),
             node("ConstantOfShape", ["shp"], ["ones"]), node("Add", ["x", "ones"], ["a"]),
             node("Tile", ["a", "reps"], ["t"]), node("Reshape", ["t", "flat"], ["t2"]),
             node("Range", ["start", "limit", "delta"], ["r"]), node("Add", ["t2", "r"], ["u"]),
             node("Pad", ["u", "pads"], ["p"]), node("Expand", ["p", "wide"], ["e"]), node("TopK", ["e", "k"], ["tk", "ti"]),
             node("OneHot", ["ind", "depth", "onoff"], ["oh"]), node("ReduceSum", ["tk"], ["s1"], keepdims=0),
             node("ReduceSum", ["oh"], ["s2"], keepdims=0), node("Add", ["s1", "s2"], ["y"])]
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def plain_files(scratch):
    """Plain .onnx files to mutate: the fixtures written by `to-onnx`, and the shapes graph."""
    from edge_runtime.cli import main

    files = []
    for name in PLAIN_SOURCES:
        path = scratch / f"{name}.onnx"
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            assert main(["to-onnx", str(model_dir(name)), str(path), "--force"]) == 0
        files.append(path)
    files.append(scratch / "shapes.onnx")
    files[-1].write_bytes(shapes_graph().SerializeToString())
    return files


def _mutate_plain(draw, path: Path) -> None:
    """Change one initializer value, attribute, input wiring or declared input dim of a plain file."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    what = draw(st.sampled_from(["initializer", "initializer", "attribute", "wiring", "input-dim"]))
    if what == "initializer" and graph.initializer:
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        array = numpy_helper.to_array(tensor).copy()
        if array.size:
            flat = array.reshape(-1)
            at = draw(st.integers(0, flat.size - 1))
            if array.dtype.kind == "f":
                flat[at] = draw(st.floats(width=32, allow_nan=True))
            elif array.dtype.kind in "iu":
                info = np.iinfo(array.dtype)
                flat[at] = min(max(draw(HOSTILE_INTS), int(info.min)), int(info.max))
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    elif what == "attribute":
        choices = [(i, a.name) for i, n in enumerate(graph.node) for a in n.attribute if a.type in (1, 2, 7)]
        if choices:
            index, name = draw(st.sampled_from(choices))
            proto = next(a for a in graph.node[index].attribute if a.name == name)
            value = (draw(st.floats(width=32)) if proto.type == 1 else draw(HOSTILE_INTS) if proto.type == 2
                     else draw(st.lists(HOSTILE_INTS, max_size=6)))
            proto.CopyFrom(helper.make_attribute(name, value, attr_type=proto.type))
    elif what == "wiring":
        names = sorted({n for node in graph.node for n in [*node.input, *node.output]} | {"x", ""})
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        if node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
    else:
        dims = graph.input[0].type.tensor_type.shape.dim
        if dims:
            dim = dims[draw(st.integers(0, len(dims) - 1))]
            value = draw(st.one_of(st.integers(0, 9), st.sampled_from([2 ** 31, 805306368, 2 ** 62])))
            dim.dim_value = value
    path.write_bytes(model.SerializeToString())


@settings(settings.get_profile("fuzz"), max_examples=PLAIN_EXAMPLES)
@given(data=st.data())
def test_mutated_plain_onnx_files_end_cleanly(worker, scratch, plain_files, data) -> None:
    source = data.draw(st.sampled_from(plain_files))
    target = scratch / f"plain-{source.name}"
    shutil.copyfile(source, target)
    try:
        if data.draw(st.integers(0, 3)):
            _mutate_plain(data.draw, target)
        for _ in range(data.draw(st.integers(0, 1))):
            _mutate_bytes(data.draw, target)
        outcome = worker.run(target, data.draw(st.sampled_from(["sparse", "dense", "ort", "auto"])))
    finally:
        target.unlink(missing_ok=True)
    _assert_clean(outcome, "plain-onnx")


# -- plans.json -----------------------------------------------------------------------------------------
PLANS_SOURCES = ("digits-mlp", "digits-cnn")
VICTIM = b"not to be overwritten\n"


@pytest.fixture(scope="module")
def tuned(scratch, worker):
    """Fixture MODEL_DIRs with a plans.json tuned by the worker itself (same key: one thread, this device)."""
    folders = []
    for name in PLANS_SOURCES:
        folder = scratch / f"tuned-{name}"
        shutil.copytree(model_dir(name), folder, ignore=shutil.ignore_patterns("plans.json"))
        assert worker.run(folder, "auto")["rc"] == 0 and (folder / "plans.json").is_file()
        folders.append(folder)
    return folders


def _mutate_plans(draw, folder: Path, victim: Path, pid: int) -> None:
    path = folder / "plans.json"
    kind = draw(st.sampled_from(["json", "json", "json", "bytes", "fifo", "dev-zero", "link-out", "huge",
                                 "folder", "pid-links"]))
    if kind == "json":
        path.write_text(json.dumps(_mutate_json(draw, json.loads(path.read_text()))))
    elif kind == "bytes":
        _mutate_bytes(draw, path)
    elif kind == "pid-links":  # the temp name the runtime wrote through before issue 20: the worker's pid
        for near in range(max(pid - 20, 1), pid + 20):
            (folder / f".plans.json.{near}.tmp").symlink_to(victim)
    else:
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev-zero":
            path.symlink_to("/dev/zero")
        elif kind == "link-out":
            path.symlink_to(victim)
        elif kind == "huge":
            with open(path, "wb") as handle:
                handle.truncate(draw(st.sampled_from([(16 << 20) + 1, 4 << 30])))
        else:
            path.mkdir()


@settings(settings.get_profile("fuzz"), max_examples=PLANS_EXAMPLES)
@given(data=st.data())
def test_mutated_plan_caches_are_ignored_cleanly(worker, scratch, tuned, data) -> None:
    source = data.draw(st.sampled_from(tuned))
    target = scratch / f"plans-{source.name}"
    victim = scratch / "victim.txt"
    victim.write_bytes(VICTIM)
    shutil.copytree(source, target, symlinks=True)
    try:
        _mutate_plans(data.draw, target, victim, worker.process.pid if worker.process else os.getpid())
        outcome = worker.run(target, "auto")
        assert victim.read_bytes() == VICTIM and not victim.is_symlink(), "a write went through a planted link"
    finally:
        shutil.rmtree(target, ignore_errors=True)
    _assert_clean(outcome, "plans.json")
    assert outcome["rc"] == 0, outcome  # a cache is only a cache: a bad one is retuned, never an error
