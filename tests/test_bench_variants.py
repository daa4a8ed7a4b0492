"""`edgeprune bench` with variants: ort-int8 is planned only where a MODEL_DIR holds the int8 variant, and
the report shows each variant's own accuracy and size beside its latency and RSS."""

from __future__ import annotations

import json

from benchmarks.sweep_plan import ModelEntry, plan
from tests.bench_fixtures import FAST, export_pruned_mlp, read_results


def test_plan_runs_ort_int8_only_on_models_with_the_variant():
    models = [ModelEntry("plain", sparsity=0.0), ModelEntry("quantized", sparsity=0.9, variants={"int8": {}})]
    configs = plan(models, ["ort", "ort-int8"], [1])
    assert [(c.model, c.kernels) for c in configs] == [(0, "ort"), (1, "ort"), (1, "ort-int8")]


def test_bench_compares_the_fp32_and_int8_variants_side_by_side(bench_cli, bench_models, tmp_path):
    quantized = export_pruned_mlp(tmp_path / "sparse90-int8", 0.9, 0.93, quantize=True)
    int8 = next(v for v in json.loads((quantized / "manifest.json").read_text())["variants"] if v["name"] == "int8")
    out = tmp_path / "out"
    code, stdout, err = bench_cli("local", bench_models["dense"], quantized, "--kernels", "ort,ort-int8", *FAST,
                                  "--out", out)
    assert code == 0, err
    records = read_results(out)["results"]
    assert [(r["model"], r["kernels"]) for r in records] == [
        ("dense", "ort"), ("sparse90-int8", "ort"), ("sparse90-int8", "ort-int8")]
    assert all(r["status"] == "ok" for r in records)
    report = (out / "report.md").read_text()
    # the int8 row: its own size (model.int8.onnx + the weights it is fed) and variant name; engine last
    int8_rows = [line for line in report.splitlines() if "| ort-int8 |" in line]
    assert len(int8_rows) == 1 and "| int8 | ort-int8 | ort-int8 | 1 |" in int8_rows[0]  # variant, kernels, engine
    assert f"| {int8['size'] / 1024:.1f} KiB |" in int8_rows[0]
    fp32_rows = [line for line in report.splitlines() if line.startswith("| sparse90-int8 |") and "| ort |" in line]
    assert len(fp32_rows) == 1 and "| fp32 | ort | ort | 1 |" in fp32_rows[0]
    # the kernels choice dropped for the model without the variant is said, not silent
    assert "ort-int8 not measured for dense: no int8 variant" in report and "sparse90-int8:" not in report


def test_the_report_names_models_a_variant_choice_skipped():
    from benchmarks.report import variant_skips

    data = {"settings": {"kernels": ["ort", "ort-int8"]}, "complete": True,
            "models": [{"label": "a"}, {"label": "b"}, {"label": "c"}],
            "results": [{"model_index": i, "kernels": "ort"} for i in range(3)]
            + [{"model_index": 1, "kernels": "ort-int8"}]}
    assert variant_skips(data) == ("ort-int8 not measured for a, c: no int8 variant in the MODEL_DIR "
                                   "(export --quantize int8 adds one).")
    data["results"] += [{"model_index": i, "kernels": "ort-int8"} for i in (0, 2)]
    assert variant_skips(data) == ""
    assert variant_skips(dict(data, settings={"kernels": ["ort"]})) == ""
