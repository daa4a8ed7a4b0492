"""The ``onnx`` package's backend test files (pytorch-converted, pytorch-operator, simple, light) through
``edge_runtime.InferenceSession`` against onnxruntime (tests/conformance_files.py): no wrong answer on
any file onnxruntime runs, every refusal one line, and the files users trip on pass.

The light models (full-size CNNs) run with the dense native engine and onnxruntime only, to keep this
under a minute; ``python3 -m tests.conformance_files`` runs every engine on every file."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytest

pytest.importorskip("onnx", reason="the files come from the onnx package (not in the pinned venv)")
pytest.importorskip("onnxruntime")

from tests import conformance_files as files  # noqa: E402  (after the skip: it needs onnx at run time)

ENGINES = {"pytorch-converted": files.KERNELS, "pytorch-operator": files.KERNELS, "simple": files.KERNELS,
           "light": ("dense", "ort")}
# Files onnxruntime runs that the runtime refuses, and why: string tensors are not numeric arrays.
REFUSED_EVERYWHERE = {"simple/test_strnorm_model_monday_casesensintive_nochangecase": "element type 8",
                      "simple/test_strnorm_model_nostopwords_nochangecase": "element type 8"}


@pytest.fixture(scope="module")
def cases() -> Dict[str, files.FileCase]:
    return {case.name: case for case in files.collect()}


@pytest.fixture(scope="module")
def references(cases) -> Dict[str, Tuple[Optional[List[Any]], str]]:
    """onnxruntime's answers, computed once for every engine's comparison."""
    return {name: files.reference(case) for name, case in cases.items()}


def _outcomes(folder: str, kernels: str, cases, references) -> List[files.Outcome]:
    return [o for name, case in cases.items() if name.startswith(f"{folder}/")
            for o in files.run_case(case, [kernels], references[name])]


def test_every_folder_is_there_and_onnxruntime_runs_most_files(cases, references) -> None:
    for folder in files.FOLDERS:
        assert any(name.startswith(f"{folder}/") for name in cases), folder
    runs = [name for name, (outputs, _) in references.items() if outputs is not None]
    assert len(cases) >= 140 and len(runs) >= 100


@pytest.mark.parametrize("folder, kernels", [(f, k) for f in files.FOLDERS for k in ENGINES[f]])
def test_no_wrong_answer_on_any_file_onnxruntime_runs(folder: str, kernels: str, cases, references) -> None:
    outcomes = _outcomes(folder, kernels, cases, references)
    wrong = [f"{o.case} [{o.kernels}]: {o.detail}" for o in outcomes if o.status == "wrong"]
    assert not wrong, "\n".join(wrong)
    refused = {o.case: o.detail for o in outcomes if o.status == "refused"}
    if kernels in ("ort", "auto"):  # onnxruntime ran these files: only a named type may be refused
        assert set(refused) <= set(REFUSED_EVERYWHERE), refused
        for name, detail in refused.items():
            assert REFUSED_EVERYWHERE[name] in detail
    else:  # natively: an op or type the runtime names
        assert all("not supported by the edge runtime" in d or "element type" in d for d in refused.values()), refused


def test_the_light_models_run_natively(cases, references) -> None:
    """light_shufflenet's Conv weights are computed in the graph (issue 21: refused by every engine)."""
    outcomes = _outcomes("light", "dense", cases, references)
    assert len(outcomes) == 9 and {o.status for o in outcomes} == {"pass"}, [o.__dict__ for o in outcomes]


def test_the_table_counts_every_outcome(cases, references) -> None:
    outcomes = _outcomes("simple", "dense", cases, references) + _outcomes("simple", "ort", cases, references)
    text = files.table(outcomes)
    assert "| simple | dense | 23 |" in text and "| **all** | ort | 23 |" in text
