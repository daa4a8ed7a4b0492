"""Fuzz the MODEL_DIR reader and the runtime's load + run path (issue 9).

Each example starts from a valid MODEL_DIR written by the real export, mutates its manifest JSON, the
bytes or arrays of weights.npz, or the bytes of model.onnx, usually makes every sha256 valid again (as
an attacker would), and runs ``edge-runtime check`` on it in a worker process under an address-space
limit (``tests/fuzz_worker.py``). Every outcome must be success, a sample mismatch (exit 1) or one line
and exit 2: never an exception escaping the CLI, never a crash of the worker.

CI runs a bounded number of examples (~30-60 s). Longer runs::

    EDGEPRUNE_FUZZ_EXAMPLES=5000 EDGEPRUNE_FUZZ_REPORT=fuzz.json python -m pytest tests/test_runtime_fuzz.py
"""

from __future__ import annotations

import atexit
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
EXAMPLES = int(os.environ.get("EDGEPRUNE_FUZZ_EXAMPLES", "500"))  # CI: 500 examples, ~6 s idle, <60 s busy
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

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "EDGEPRUNE_MAX_MODEL_BYTES": MODEL_LIMIT, "PYTHONPATH": str(REPO),
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
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
    STATS["inputs"] += 1
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
           "weights.npz", "failed while running", "cannot be loaded", "not supported", "out of memory", "input")


def _reason(stderr: str) -> str:
    """A coarse label of what refused the folder: shows how deep the mutations reach."""
    reason = next((reason for reason in REASONS if reason in stderr), "other")
    if reason == "other" and os.environ.get("EDGEPRUNE_FUZZ_VERBOSE"):
        print(stderr.strip())
    return reason
