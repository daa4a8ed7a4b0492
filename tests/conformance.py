"""ONNX's own operator test cases, run through the edge runtime's native executor.

The ``onnx`` package defines a test case per operator behaviour (``onnx.backend.test.case.node``):
a one-node model (or its function expansion), inputs and expected outputs. For every case of every
op the runtime claims (``edge_runtime.ops.OPS`` plus the weight layers), this builds the node list,
runs it with ``graph.compile_nodes`` and compares with ONNX's tolerances (the case's rtol/atol,
1e-3/1e-7 by default, as ONNX's backend runner does), exact dtype and shape.

Variants: ``plain`` feeds every input as the case gives it; for Conv/Gemm/MatMul, ``dense``,
``sparse`` and ``sparse-mt`` also make the weight (and bias) initializers, so the weight kernels run
(CSR for the sparse ones). An outcome is ``pass``, ``refused`` (an UnsupportedOpError naming the op
and why) or ``wrong`` (a different answer, or any other exception).

    python3 -m tests.conformance [--op NAME ...] [--verbose] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_runtime.errors import UnsupportedOpError
from edge_runtime.graph import WEIGHT_OPS, ArrayWeights, compile_nodes
from edge_runtime.ops import OPS

DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7
# Cases whose expected output older onnx releases computed wrongly (onnx's own reference was fixed
# later; onnxruntime and the runtime agree with the fixed one): case → (onnx version that has the fix, why).
STALE = {"test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True":
         ((1, 23), "onnx's reference let ceil_mode windows start in the end padding")}
EXPANDED = re.compile(r"_expanded(_ver\d+)?$")
WEIGHT_VARIANTS = ("dense", "sparse", "sparse-mt")


@dataclass
class Outcome:
    case: str
    variant: str
    status: str          # pass | refused | wrong | skipped (the case's values are not tensors)
    detail: str = ""


def claimed_ops() -> List[str]:
    return sorted(set(OPS) | set(WEIGHT_OPS))


def _attribute(attribute: Any) -> Any:
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    if hasattr(value, "data_type") and hasattr(value, "dims"):  # TensorProto
        return numpy_helper.to_array(value)
    return value


def node_dicts(graph: Any) -> List[Dict[str, Any]]:
    """The graph's nodes in the form a MODEL_DIR's manifest carries them."""
    return [{"op_type": n.op_type, "name": n.name, "domain": n.domain, "inputs": list(n.input),
             "outputs": list(n.output), "attributes": {a.name: _attribute(a) for a in n.attribute}}
            for n in graph.node]


def _array(value: Any) -> Optional[np.ndarray]:
    from onnx import TensorProto, numpy_helper

    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else None


def _onnx_version() -> Tuple[int, int]:
    import onnx

    return tuple(int(part) for part in onnx.__version__.split(".")[:2])  # type: ignore[return-value]


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def collect() -> Dict[str, List[Any]]:
    """Every ONNX node test case, by the op it tests (function expansions under their op too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        cases = collect_testcases(None)  # onnx < 1.18 has no default
    op_of = {c.name: c.model.graph.node[0].op_type for c in cases
             if not EXPANDED.search(c.name) and len(c.model.graph.node) == 1}
    by_op: Dict[str, List[Any]] = defaultdict(list)
    for case in cases:
        op = op_of.get(EXPANDED.sub("", case.name))
        if op is not None:
            by_op[op].append(case)
    return by_op


def _compare(got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> str:
    """'' when equal within tolerance, else what differs."""
    got = np.asarray(got)
    if got.dtype != expected.dtype:
        return f"dtype {got.dtype}, expected {expected.dtype}"
    if got.shape != expected.shape:
        return f"shape {got.shape}, expected {expected.shape}"
    if expected.dtype.kind in "biuO":
        return "" if np.array_equal(got, expected) else "values differ"
    try:
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as error:
        return "values: " + " ".join(str(error).split())[:200]
    return ""


def _variants(op: str, node: Dict[str, Any], graph_inputs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """(variant, names made initializers): the plain feed, and for weight ops the weight-kernel runs."""
    variants = [("plain", [])]
    inputs = node["inputs"]
    if op in WEIGHT_OPS and len(inputs) > 1 and inputs[1] in graph_inputs:
        constant = [name for name in inputs[1:3] if name and name in graph_inputs]
        variants += [(kind, constant) for kind in WEIGHT_VARIANTS]
    return variants


def run_case(op: str, case: Any, pool: Optional[ThreadPoolExecutor] = None) -> List[Outcome]:
    """Every variant of every data set of one case."""
    graph = case.model.graph
    nodes = node_dicts(graph)
    input_names = [i.name for i in graph.input]
    output_names = [o.name for o in graph.output]
    rtol = case.rtol if case.rtol is not None else DEFAULT_RTOL
    atol = case.atol if case.atol is not None else DEFAULT_ATOL
    stale = STALE.get(case.name)
    if stale and _onnx_version() < stale[0]:
        return [Outcome(case.name, "plain", "skipped", f"expected output is stale before onnx {stale[0]}: {stale[1]}")]
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input if i.type.HasField("tensor_type")}
    outcomes = []
    for variant, constant in _variants(op, nodes[0], input_names) if len(nodes) == 1 else [("plain", [])]:
        for inputs, expected in case.data_sets:
            outcomes.append(_run_one(case.name, variant, nodes, input_names, output_names, constant,
                                     inputs, expected, _opset(case.model), rtol, atol, pool, types))
    return outcomes


def _run_one(name: str, variant: str, nodes: List[Dict[str, Any]], input_names: List[str],
             output_names: List[str], constant: List[str], inputs: Sequence[Any], expected: Sequence[Any],
             opset: int, rtol: float, atol: float, pool: Optional[ThreadPoolExecutor],
             types: Dict[str, int]) -> Outcome:
    feed = {n: _array(v) for n, v in zip(input_names, inputs)}
    wanted = [_array(v) for v in expected]
    if any(v is None for v in feed.values()) or any(v is None for v in wanted):
        return Outcome(name, variant, "skipped", "sequence/optional values (not tensors)")
    tensors = {n: feed.pop(n) for n in constant}
    kind = "dense" if variant in ("plain", "dense") else variant
    try:
        program = compile_nodes(nodes, list(feed), output_names,
                                ArrayWeights(tensors, sparse=constant if kind != "dense" else ()),
                                lambda _: kind, pool if kind == "sparse-mt" else None,
                                2 if kind == "sparse-mt" else 1, opset, types)
        with np.errstate(all="ignore"):
            got = program.run(feed)
    except UnsupportedOpError as error:
        return Outcome(name, variant, "refused", str(error))
    except Exception as error:  # a crash is a wrong answer: the runtime must refuse or be right
        return Outcome(name, variant, "wrong", f"{type(error).__name__}: {error}"[:300])
    problems = [f"{n}: {p}" for n, g, w in zip(output_names, got, wanted) if (p := _compare(g, w, rtol, atol))]
    return Outcome(name, variant, "wrong" if problems else "pass", "; ".join(problems))


def run_op(op: str, cases: Sequence[Any], pool: Optional[ThreadPoolExecutor] = None) -> List[Outcome]:
    """Every case of ``op`` whose nodes are all claimed (an expansion using other ops is skipped)."""
    claimed = set(claimed_ops())
    outcomes = []
    for case in cases:
        if all(n.op_type in claimed for n in case.model.graph.node):
            outcomes.extend(run_case(op, case, pool))
    return outcomes


def run_all(ops: Sequence[str]) -> Dict[str, List[Outcome]]:
    by_op = collect()
    with ThreadPoolExecutor(2) as pool:
        return {op: run_op(op, by_op.get(op, []), pool) for op in ops}


def table(results: Dict[str, List[Outcome]]) -> str:
    """Markdown: op, runs (case × variant × data set), pass, refused, wrong, skipped; and totals."""
    lines = ["| op | runs | pass | refused | wrong | skipped |", "|---|---:|---:|---:|---:|---:|"]
    totals: Counter = Counter()
    for op, outcomes in sorted(results.items()):
        counts = Counter(o.status for o in outcomes)
        totals.update(counts)
        totals["runs"] += len(outcomes)
        lines.append(f"| {op} | {len(outcomes)} | {counts['pass']} | {counts['refused']} | {counts['wrong']} "
                     f"| {counts['skipped']} |")
    lines.append(f"| **total ({len(results)} ops)** | {totals['runs']} | {totals['pass']} | "
                 f"{totals['refused']} | {totals['wrong']} | {totals['skipped']} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="list every refusal and wrong answer")
    parser.add_argument("--json", help="write every outcome to this file")
    args = parser.parse_args(argv)
    results = run_all(args.op or claimed_ops())
    print(table(results))
    for op, outcomes in sorted(results.items()):
        for o in outcomes:
            if o.status == "wrong" or (args.verbose and o.status == "refused"):
                print(f"{o.status.upper():8} {op:20} {o.case} [{o.variant}]: {o.detail}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({op: [o.__dict__ for o in outs] for op, outs in results.items()}, handle, indent=1)
    return 1 if any(o.status == "wrong" for outs in results.values() for o in outs) else 0


if __name__ == "__main__":
    sys.exit(main())
