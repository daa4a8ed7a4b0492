"""``--latency-on user@host``: a real measurement on the loopback device through the test sshd (the
runtime installed there under the deploy lock), the table kept in RUN_DIR and in the user cache, and
reused on the next call without measuring on the device again. Under CI=true a missing sshd fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import remote_latency
from edge_runtime.layer_timing import read_table
from tests.compressor_fixtures import ENV, REPO
from tests.sshd import device_python

TRAIN = ["--epochs", "2", "--lr-drops", "1", "--rewind-epoch", "0", "--method", "lr-rewind", "--seed", "3",
         "--no-progress"]


def _connection(sshd, root: Path) -> list:
    return [*sshd.cli_args(), "--remote-root", str(root), "--python", device_python(), "--timeout", "30"]


def test_compress_latency_on_a_device_measures_there_then_reuses_the_cached_table(
        sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import subprocess
    import sys

    root, cache, out = tmp_path / "device root", tmp_path / "cache", tmp_path / "run"
    env = {**ENV, "XDG_CACHE_HOME": str(cache)}
    done = subprocess.run([sys.executable, "-m", "edgeprune", "compress", "--model", "digits-cnn", "--structure",
                           "channels", "--allocate", "latency", "--target-macs", "0.5", *TRAIN, "--out", str(out),
                           "--latency-on", sshd.spec, *_connection(sshd, root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr + sshd.log
    table = read_table(out / "latency_table.json")
    assert table.device and table.call_ms > 0 and table.engine == "ort"
    assert (root / "venv" / "bin" / "python").exists()  # the runtime deploy installs, installed by --latency-on
    assert not [p for p in (root / "scratch").iterdir() if p.name.startswith("latency-")]  # its work is removed
    assert len(list((cache / "edgeprune" / "latency").iterdir())) == 1

    # the same device again: the table comes from the cache; nothing is measured there
    measured = []
    monkeypatch.setattr(remote_latency.RemoteLatency, "_measure", lambda self, device, argv: measured.append(argv))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    from edgeprune.cli import main

    code = main(["bench", sshd.spec, "--latency-table", "digits-cnn", "--out", str(tmp_path / "again.json"),
                 *_connection(sshd, root)])
    assert code == 0 and measured == [], capsys.readouterr().err
    assert "from the cache" in capsys.readouterr().out
    assert read_table(tmp_path / "again.json").ms == table.ms


def test_bench_latency_table_int8_on_a_device_then_another_engine_is_measured_again(
        sshd, bench_device_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeprune.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    steps = []
    real = remote_latency.RemoteLatency._measure
    monkeypatch.setattr(remote_latency.RemoteLatency, "_measure",
                        lambda self, device, argv: (steps.append(argv), real(self, device, argv)))
    for quantize in ("int8", "int8", "none"):
        code = main(["bench", sshd.spec, "--latency-table", "digits-mlp", "--quantize", quantize,
                     "--out", str(tmp_path / f"{quantize}.json"), *_connection(sshd, bench_device_root)])
        assert code == 0
    assert [argv[argv.index("--engine") + 1] for argv in steps] == ["ort-int8", "ort"]
    assert read_table(tmp_path / "int8.json").engine == "ort-int8"


def test_a_device_returning_a_bad_table_is_one_line(sshd, bench_device_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """The device's answer is untrusted: a flat table (every shape 1.0 ms) is refused before it is used."""
    from edgeprune.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def flat(self, device, argv):
        out = argv[argv.index("--out") + 1]
        shapes = json.loads(device.read_text(argv[argv.index("--shapes") + 1]))["shapes"]
        from edge_runtime.layer_timing import LatencyTable, LayerShape

        keys = [LayerShape.from_dict(s, "shapes").key() for s in shapes]
        device.write_text(out, LatencyTable({k: 1.0 for k in keys}, device="d", engine="ort").to_json())

    monkeypatch.setattr(remote_latency.RemoteLatency, "_measure", flat)
    code = main(["bench", sshd.spec, "--latency-table", "digits-cnn", "--out", str(tmp_path / "t.json"),
                 *_connection(sshd, bench_device_root)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "is flat" in errors[0], err
    assert not (tmp_path / "t.json").exists()
    assert not os.path.exists(tmp_path / "cache" / "edgeprune" / "latency") or \
        not os.listdir(tmp_path / "cache" / "edgeprune" / "latency")  # a refused table is never cached
