"""Wall time of ``edgeprune compress`` (resnet20) with 1 and several processes under torchrun.

    python3 benchmarks/studies/distributed.py                           # CPU: 1×2 threads, 2×1, 1×1; 2 epochs
    python3 benchmarks/studies/distributed.py --train 5000 --epochs 3 --json dist.json
    python3 benchmarks/studies/distributed.py --device cuda --procs 1,2 # one process per GPU

The data is synthetic CIFAR-10 in the standard python-pickle format (data_batch_1..5, test_batch;
``--train`` images in all), written to a temporary folder, so the numbers measure the engine, not a
download. Each configuration runs the real command (``torchrun --standalone ... -m edgeprune compress``
for several processes) from scratch: dense training plus one pruning level (``--target-sparsity 0.2``).
``wall`` is the whole command, start-up included; ``train`` sums the levels' ``seconds`` from
metrics.json (training + evaluation only). The machine's load average is recorded beside each row,
because on a shared machine it moves the numbers more than anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from edge_runtime.safe_io import atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def write_synthetic_cifar(folder: Path, train: int, test: int, seed: int = 0) -> None:
    """CIFAR-10-format batches: uint8 N×3072 ``b"data"`` and ``b"labels"``; each class has its own tint
    so the network has something to learn."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 256, size=(10, 3), dtype=np.int64)

    def batch(n: int) -> Dict[bytes, Any]:
        labels = rng.integers(0, 10, size=n)
        noise = rng.integers(0, 256, size=(n, 3, 1024), dtype=np.int64)
        images = (noise + tints[labels][:, :, None]) // 2
        return {b"data": images.reshape(n, 3072).astype(np.uint8), b"labels": labels.tolist()}

    folder.mkdir(parents=True, exist_ok=True)
    per_file = train // 5
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_file)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))


def command(procs: int, data: Path, out: Path, epochs: int, batch_size: int, device: str) -> List[str]:
    """The measured command line."""
    args = ["compress", "--model", "resnet20", "--data", f"cifar10:{data}", "--out", str(out),
            "--epochs", str(epochs), "--lr-drops", "none", "--batch-size", str(batch_size),
            "--target-sparsity", "0.2", "--device", device, "--no-progress"]
    if procs == 1:
        return [sys.executable, "-m", "edgeprune", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
            "--module", "edgeprune", *args]


def measure(procs: int, threads: int, data: Path, epochs: int, batch_size: int, device: str) -> Dict[str, Any]:
    """Run one configuration from scratch; its wall time, training seconds and accuracy."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="edgeprune-dist-bench-") as out:
        load_before = os.getloadavg()[0]
        began = time.perf_counter()
        proc = subprocess.run(command(procs, data, Path(out) / "run", epochs, batch_size, device),
                              cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - began
        if proc.returncode != 0:
            raise SystemExit(f"{procs} process(es) failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(out) / "run" / "metrics.json").read_text())
    levels = metrics["methods"]["lr-rewind"]
    return {"procs": procs, "threads_per_proc": threads, "wall_seconds": round(wall, 2),
            "train_seconds": round(sum(e["seconds"] for e in levels), 2),
            "dense_accuracy": levels[0]["accuracy"], "final_accuracy": levels[-1]["accuracy"],
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def parse_configs(text: str) -> List[Tuple[int, int]]:
    """``"1x2,2x1"`` → ``[(1, 2), (2, 1)]`` (processes × threads per process)."""
    configs = []
    for part in text.split(","):
        procs, _, threads = part.partition("x")
        configs.append((int(procs), int(threads or 1)))
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1x2,2x1,1x1",
                        help="processes×threads per process, comma separated (default: %(default)s)")
    parser.add_argument("--train", type=int, default=2560, help="synthetic training images (default: %(default)s)")
    parser.add_argument("--test", type=int, default=1000, help="synthetic test images (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per level (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="GLOBAL batch (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeprune-cifar-") as data:
        write_synthetic_cifar(Path(data), args.train, args.test)
        for procs, threads in parse_configs(args.configs):
            rows.append(measure(procs, threads, Path(data), args.epochs, args.batch_size, args.device))
            print(f"done: {procs}×{threads}", file=sys.stderr)

    print(f"resnet20, {args.train} synthetic CIFAR images, {args.epochs} epochs × (dense + 1 level), "
          f"global batch {args.batch_size}, device {args.device}, {os.cpu_count()} CPUs")
    print(f"{'procs×threads':>13} {'wall s':>8} {'train s':>8} {'speed-up':>8} {'acc':>6} {'load':>11}")
    base = rows[0]["train_seconds"]
    for row in rows:
        print(f"{row['procs']:>8}×{row['threads_per_proc']:<4} {row['wall_seconds']:>8.1f} "
              f"{row['train_seconds']:>8.1f} {base / row['train_seconds']:>7.2f}× "
              f"{row['final_accuracy']:>6.1%} {row['load_before']:>5.1f}→{row['load_after']:<5.1f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"train_images": args.train, "epochs": args.epochs,
                                         "batch_size": args.batch_size, "device": args.device,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
