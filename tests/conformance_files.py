"""Whole ONNX files of the ``onnx`` package's backend test data through ``edge_runtime.InferenceSession``,
answer for answer against onnxruntime on the same file and inputs.

Folders (inside the installed package, ``onnx/backend/test/data/``): ``pytorch-converted`` and
``pytorch-operator`` (what torch's exporter wrote for its modules and operators), ``simple`` (small
hand-made graphs) and ``light`` (the model zoo's classic CNNs, weights made in the graph). A case folder
gives its ``test_data_set_0`` inputs; a light model gets seeded inputs of its declared shape (as onnx's
own runner does, with its own seed).

Per file, onnxruntime runs first: a file it cannot load or run is ``ort-refused`` and counts for
nothing else. Then each engine (``--kernels``: dense, sparse, auto, ort by default) loads and runs it:
``pass`` (every output the same dtype and shape, values within tolerance), ``refused`` (one of the
runtime's own errors: an op or type it does not run, said in one line) or ``wrong`` (a different
answer, or any other exception). Wrong must be 0.

    python3 -m tests.conformance_files [--folder NAME ...] [--kernels K ...] [--verbose] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

FOLDERS = ("pytorch-converted", "pytorch-operator", "simple", "light")
KERNELS = ("dense", "sparse", "auto", "ort")
# onnxruntime and numpy sum in different orders: deep CNNs (densenet121) drift by ~1e-5 of their
# output's scale. An answer is right within RTOL of each value plus ATOL of the output's largest value.
RTOL, ATOL = 1e-3, 1e-4


@dataclass
class FileCase:
    name: str                 # folder/case
    model: Path
    feed: Optional[Dict[str, Any]]  # None: the inputs could not be read (reason in ``why``)
    why: str = ""


@dataclass
class Outcome:
    case: str
    kernels: str
    status: str               # pass | refused | wrong | ort-refused
    detail: str = ""


def data_root() -> Path:
    import onnx

    return Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"


def _value(path: Path) -> Any:
    """An input file: a TensorProto as an array, a SequenceProto as a list of arrays."""
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    if tensor.data_type:
        return numpy_helper.to_array(tensor)
    sequence = onnx.SequenceProto()
    sequence.ParseFromString(data)
    return numpy_helper.to_list(sequence)


def _graph_inputs(model: Any) -> List[Any]:
    stored = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in stored]


def _seeded_feed(model: Any, seed: int = 0) -> Dict[str, np.ndarray]:
    """Seeded inputs of each declared shape (a free axis: 1); integers as zeros, floats as noise."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    feed = {}
    for spec in _graph_inputs(model):
        tensor = spec.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        feed[spec.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(shape, dtype))
    return feed


def _case_feed(model_path: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    folder = model_path.parent / "test_data_set_0"
    if model_path.name != "model.onnx":  # a light model: no data sets beside it
        return _seeded_feed(model), ""
    names = [i.name for i in _graph_inputs(model)]
    files = sorted(folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    if len(files) != len(names):
        return None, f"{len(files)} input files for {len(names)} inputs"
    return {name: _value(path) for name, path in zip(names, files)}, ""


def collect(folders: Sequence[str] = FOLDERS) -> List[FileCase]:
    """Every model file of ``folders`` with its inputs."""
    cases = []
    for folder in folders:
        base = data_root() / folder
        models = sorted(base.glob("*.onnx")) if folder == "light" else sorted(base.glob("*/model.onnx"))
        for model in models:
            name = f"{folder}/{model.stem if folder == 'light' else model.parent.name}"
            feed, why = _case_feed(model)
            cases.append(FileCase(name, model, feed, why))
    return cases


def _compare(got: Any, expected: Any) -> str:
    """'' when ``got`` is onnxruntime's answer within tolerance, else what differs."""
    if isinstance(expected, list) or not isinstance(got, np.ndarray):
        return f"a {type(got).__name__} where onnxruntime gave a {type(expected).__name__}"
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return f"{got.dtype}{list(got.shape)}, onnxruntime {expected.dtype}{list(expected.shape)}"
    if expected.dtype.kind in "biuO" or expected.size == 0:
        return "" if np.array_equal(got, expected) else "values differ"
    scale = float(np.max(np.abs(expected[np.isfinite(expected)]), initial=1.0))
    if np.allclose(got, expected, rtol=RTOL, atol=ATOL * scale, equal_nan=True):
        return ""
    return f"values differ by up to {float(np.nanmax(np.abs(got - expected))):.3g} (scale {scale:.3g})"


def run_ort(case: FileCase) -> Tuple[Optional[List[Any]], str]:
    """onnxruntime's outputs on the case, or None and why it refused."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(case.model), options, providers=["CPUExecutionProvider"])
        return session.run(None, case.feed), ""
    except Exception as error:  # whatever onnxruntime says: the file is not one it runs
        return None, " ".join(str(error).split())[:200]


def run_engine(case: FileCase, kernels: str, expected: List[Any]) -> Outcome:
    from edge_runtime import InferenceSession
    from edge_runtime.errors import EdgeRuntimeError

    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            session = InferenceSession(case.model, kernels=kernels, threads=1)
            got = session.run(None, case.feed)
    except EdgeRuntimeError as error:
        message = str(error)
        if "\n" in message:
            return Outcome(case.name, kernels, "wrong", f"a refusal of several lines: {message[:200]}")
        return Outcome(case.name, kernels, "refused", message[:300])
    except Exception as error:  # a crash is a wrong answer: the runtime must refuse or be right
        return Outcome(case.name, kernels, "wrong", f"{type(error).__name__}: {error}"[:300])
    if len(got) != len(expected):
        return Outcome(case.name, kernels, "wrong", f"{len(got)} outputs, onnxruntime {len(expected)}")
    problems = [f"output {i}: {p}" for i, (g, e) in enumerate(zip(got, expected)) if (p := _compare(g, e))]
    return Outcome(case.name, kernels, "wrong" if problems else "pass", "; ".join(problems))


def reference(case: FileCase) -> Tuple[Optional[List[Any]], str]:
    """onnxruntime's outputs, or None and why there are none (inputs unreadable, or it refused)."""
    if case.feed is None:
        return None, f"inputs unreadable: {case.why}"
    return run_ort(case)


def run_case(case: FileCase, kernels: Sequence[str] = KERNELS,
             expected: Optional[Tuple[Optional[List[Any]], str]] = None) -> List[Outcome]:
    """Each engine of ``kernels`` on ``case`` (``expected``: its ``reference`` when already known)."""
    outputs, why = expected or reference(case)
    if outputs is None:
        return [Outcome(case.name, k, "ort-refused", why) for k in kernels]
    return [run_engine(case, k, outputs) for k in kernels]


def table(outcomes: Sequence[Outcome]) -> str:
    """Markdown: per folder and engine, files onnxruntime runs, pass, refused, wrong; and totals."""
    lines = ["| folder | kernels | files | onnxruntime refuses | pass | refused | wrong |",
             "|---|---|---:|---:|---:|---:|---:|"]
    groups: Dict[Tuple[str, str], Counter] = {}
    for o in outcomes:
        groups.setdefault((o.case.split("/")[0], o.kernels), Counter())[o.status] += 1
    totals: Dict[str, Counter] = {}
    for (folder, kernels), counts in groups.items():
        totals.setdefault(kernels, Counter()).update(counts)
        lines.append(_row(folder, kernels, counts))
    lines += [_row("**all**", kernels, counts) for kernels, counts in totals.items()]
    return "\n".join(lines)


def _row(folder: str, kernels: str, counts: Counter) -> str:
    files = sum(counts.values())
    return (f"| {folder} | {kernels} | {files} | {counts['ort-refused']} | {counts['pass']} | {counts['refused']} "
            f"| {counts['wrong']} |")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", action="append", choices=FOLDERS, help="only this folder (repeatable)")
    parser.add_argument("--kernels", action="append", help=f"engines to run (default: {', '.join(KERNELS)})")
    parser.add_argument("--verbose", action="store_true", help="list every refusal too")
    parser.add_argument("--json", help="write every outcome to this file")
    args = parser.parse_args(argv)
    outcomes = [o for case in collect(args.folder or FOLDERS) for o in run_case(case, args.kernels or KERNELS)]
    print(table(outcomes))
    for o in outcomes:
        if o.status == "wrong" or (args.verbose and o.status in ("refused", "ort-refused")):
            print(f"{o.status.upper():11} {o.case:55} [{o.kernels}]: {o.detail}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([o.__dict__ for o in outcomes], handle, indent=1)
    return 1 if any(o.status == "wrong" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
