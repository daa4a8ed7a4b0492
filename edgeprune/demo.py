"""``edgeprune demo``: the whole job on the embedded digits data, end to end.

compress (learning-rate rewinding) → export the sparsest level within one point of dense → measure
every chosen level on the local runtime against stock onnxruntime on the dense model → print the
accuracy / sparsity / latency table. Each step is the real subcommand, called as a user would call
it, so the demo can never drift from what the commands do.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import List, Tuple

from compressor.errors import CompressorError

USER_ERRORS = (CompressorError,)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run compress → export → bench on the embedded digits data set and print the "
        "accuracy/sparsity/latency table. Everything lands in --out.")
    parser.add_argument("--out", type=Path, default=Path("edgeprune-demo"),
                        help="folder for the run, the exported model and the benchmark (default: edgeprune-demo)")
    parser.add_argument("--model", default="digits-wide-mlp",
                        help="model to compress (default: digits-wide-mlp, 64→1024→1024→10)")
    parser.add_argument("--target-sparsity", type=float, default=0.95,
                        help="final sparsity (default: 0.95: 13 rounds of 20%%, the last one 27%%)")
    parser.add_argument("--epochs", type=int, default=15,
                        help="epochs of the training schedule, replayed at every level (default: 15)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for training and for the benchmark (default: 1; tiny models "
                        "train faster on one thread)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete --out's previous demo and start over (default: continue it, so running "
                        "the demo again just reuses what is done)")
    parser.add_argument("--readme-sample", type=Path, metavar="README",
                        help="afterwards, write what the demo printed (the export line and the table) into "
                        "README's sample block (between its demo-sample markers): the README shows a real run")


def _levels_to_measure(run_dir: Path) -> str:
    """Dense plus a spread of sparsities: every level would make the demo slow without saying more."""
    from compressor.run.run_dir import list_levels

    levels = sorted({info.level for info in list_levels(run_dir)})
    wanted = {0, levels[-1]}
    for target in (0.5, 0.8, 0.9):
        # the first level at or past each landmark sparsity (densities are 0.8^k)
        wanted.add(next((lvl for lvl in levels if 1 - 0.8 ** lvl >= target), levels[-1]))
    return ",".join(str(level) for level in sorted(wanted))


def _forget_previous(out: Path, parts: tuple) -> None:
    """Remove the demo's own folders under ``out`` (and nothing else a user may keep there)."""
    import shutil

    for part in parts:
        if part.exists():
            print(f"--fresh: removing {part}", flush=True)
            shutil.rmtree(part)


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(args: argparse.Namespace) -> int:
    from edgeprune.cli import main as edgeprune

    out: Path = args.out
    run_dir, model_dir, bench_dir = out / "run", out / "model", out / "bench"
    began = time.perf_counter()

    _step(f"1/3 compress {args.model} to {args.target_sparsity:.0%} sparsity (learning-rate rewinding)")
    compress: List[str] = ["compress", "--model", args.model, "--data", "digits", "--out", str(run_dir),
                           "--target-sparsity", str(args.target_sparsity), "--epochs", str(args.epochs),
                           "--threads", str(args.threads)]
    if args.fresh:
        _forget_previous(out, (run_dir, model_dir, bench_dir))
    if run_dir.exists():
        # A second run of the demo continues the first: finished levels are kept, not retrained.
        compress.append("--resume")
    code = edgeprune(compress)
    if code:
        return code

    _step("2/3 export the sparsest level within 1 point of dense accuracy")
    code = edgeprune(["export", str(run_dir), "--out", str(model_dir), "--max-drop", "1", "--force"])
    if code:
        return code

    _step("3/3 benchmark on this machine: edge_runtime (auto kernels) against stock onnxruntime")
    code = edgeprune(["bench", "local", "--run", str(run_dir), "--levels", _levels_to_measure(run_dir),
                      "--kernels", "ort,auto", "--threads", str(args.threads), "--min-seconds", "1",
                      "--out", str(bench_dir), "--overwrite"])

    print(f"\ndemo finished in {time.perf_counter() - began:.0f} s. Look at:")
    print(f"  {run_dir}/report.md, {run_dir}/sparsity_accuracy.png   accuracy at every level")
    print(f"  {model_dir}/                                  the deployable MODEL_DIR")
    print(f"  {bench_dir}/report.md and its plots            latency and memory per level")
    print(f"next: edgeprune deploy pi@HOST {model_dir}")
    if code == 0 and args.readme_sample is not None:
        write_readme_sample(args.readme_sample, readme_sample(out))
        print(f"wrote the sample output into {args.readme_sample}")
    return code


SAMPLE_START = "<!-- demo-sample: written by `edgeprune demo --readme-sample README.md`; tests compare its shape -->"
SAMPLE_END = "<!-- /demo-sample -->"


def readme_sample(out: Path) -> str:
    """The demo's outcome as the README shows it: one line on the exported model, then the table the
    bench printed (rebuilt from ``out``'s results.json and MODEL_DIR, so it is exactly the run's)."""
    from benchmarks.report import results_table, rows
    from edge_runtime.model_dir import read_manifest
    from edge_runtime.model_format import shipped_bytes

    manifest = read_manifest(out / "model")
    size, dense = shipped_bytes(out / "model", manifest), manifest["sizes"]["dense_onnx"]
    source = manifest.get("source") or {}
    exported = (f"exported {source.get('method')} level {source.get('level')}: sparsity {manifest['sparsity']:.1%}, "
                f"accuracy {manifest['accuracy']:.2%}, {size / 1024:.1f} KiB ({dense / size:.2f}× smaller than "
                f"its dense ONNX file, {dense / 1024 / 1024:.2f} MiB)")
    data = json.loads((out / "bench" / "results.json").read_text())
    return exported + "\n\n" + results_table(rows(data), several_hosts=False)


def readme_block(readme_text: str) -> Tuple[int, int]:
    """Where README's sample block lies (the text between the markers); ValueError without markers."""
    start = readme_text.index(SAMPLE_START) + len(SAMPLE_START)
    return start, readme_text.index(SAMPLE_END, start)


def write_readme_sample(readme: Path, sample: str) -> None:
    """Replace README's sample block with ``sample`` (a fenced block between the markers)."""
    from edge_runtime.safe_io import atomic_write_text

    text = readme.read_text(encoding="utf-8")
    start, end = readme_block(text)
    atomic_write_text(readme, text[:start] + "\n```\n" + sample + "\n```\n" + text[end:])


def sample_shape(sample: str) -> Tuple[List[str], set]:
    """What a sample must keep from run to run: its non-table lines and each table row's cells with
    the numbers masked (``#``, sizes ``# iB``) and words as ``w`` (engines, variants vary by machine)."""
    def mask(cell: str) -> str:
        cell = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", cell.strip())
        cell = re.sub(r"[KM]iB", "iB", cell)
        return cell if "#" in cell else "w"

    lines = [line for line in sample.strip().splitlines() if line.strip() and line.strip() != "```"]
    text = [mask(line) for line in lines if not line.startswith("|")]
    table = [line for line in lines if line.startswith("|")]
    header = table[:2]
    rows = {tuple(mask(cell) for cell in line.strip("|").split("|")) for line in table[2:]}
    return text + header, rows
