"""Reading a RUN_DIR never runs a Python file that the run names (issue 9), and a run made with a
factory can be exported from any folder when the user names the file (issue 10).

Every factory file here touches a marker file when it is imported, so "did it run?" is a fact on
disk, not a guess. Hostile RUN_DIRs are built by the tests from a real run.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from compressor.errors import UntrustedFactoryError
from compressor.train.models import file_sha256
from compressor.run.run_dir import load_level
from tests.compressor_fixtures import ENV, REPO, tree_snapshot

FACTORY = '''
from pathlib import Path
import torch
from torch import nn

Path(__file__).with_name(Path(__file__).stem + ".RAN").touch()  # proof that this file was executed


class Net(nn.Module):
    input_shape = (64,)

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def build():
    return Net()
'''

FAST = ["--epochs", "1", "--lr-drops", "none", "--target-sparsity", "0.2", "--no-progress"]


def edgeprune(args: List[str], cwd: Path) -> Tuple[int, str, str]:
    """The real command, run from ``cwd`` (relative paths are the point of some tests)."""
    proc = subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_exit_2(result: Tuple[int, str, str]) -> str:
    code, _, err = result
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory) -> Path:
    """A run made by `edgeprune compress --model my_net.py:build` with a RELATIVE factory path."""
    work = tmp_path_factory.mktemp("work")
    (work / "my_net.py").write_text(FACTORY)
    code, out, err = edgeprune(["compress", "--model", "my_net.py:build", *FAST, "--out", "run"], cwd=work)
    assert code == 0, err
    (work / "my_net.RAN").unlink()
    return work / "run"


def test_the_run_records_the_factory_as_an_absolute_path_and_its_sha256(factory_run):
    config = json.loads((factory_run / "config.json").read_text())
    factory = factory_run.parent / "my_net.py"
    assert config["model"] == f"{factory.resolve()}:build"
    assert config["model_sha256"] == file_sha256(factory)


def test_export_and_bench_refuse_to_run_the_named_file_without_model(factory_run, tmp_path):
    marker = factory_run.parent / "my_net.RAN"
    before = tree_snapshot(factory_run)
    err = one_line_exit_2(edgeprune(["export", str(factory_run), "--out", str(tmp_path / "md")], cwd=tmp_path))
    sha = json.loads((factory_run / "config.json").read_text())["model_sha256"]
    assert "my_net.py:build" in err and sha in err and "--model" in err
    err = one_line_exit_2(edgeprune(["bench", "local", "--run", str(factory_run), "--out", str(tmp_path / "b")],
                                    cwd=tmp_path))
    assert sha in err and "--model" in err
    with pytest.raises(UntrustedFactoryError, match=sha):
        load_level(factory_run)
    assert not marker.exists() and not (tmp_path / "md").exists()
    assert tree_snapshot(factory_run) == before


def test_export_from_another_folder_with_the_named_factory(factory_run, tmp_path):
    """Issue 10: `export RUN_DIR --model file.py:factory` was refused, and a relative path broke it."""
    factory = factory_run.parent / "my_net.py"
    code, out, err = edgeprune(["export", str(factory_run), "--model", f"{factory}:build",
                                "--out", str(tmp_path / "md")], cwd=tmp_path)
    assert code == 0, err
    assert (factory_run.parent / "my_net.RAN").exists()  # the user named it: it ran
    assert json.loads((tmp_path / "md" / "manifest.json").read_text())["sparsity"] == pytest.approx(0.2, abs=0.01)
    (factory_run.parent / "my_net.RAN").unlink()
    # Another file (a copy edited since): built because the user named it, with one line saying so.
    (tmp_path / "edited.py").write_text(FACTORY + "\n# edited\n")
    code, out, err = edgeprune(["export", str(factory_run), "--model", "edited.py:build",
                                "--out", str(tmp_path / "md2")], cwd=tmp_path)
    mismatch = [line for line in err.splitlines() if "is not the file this run was made with" in line]
    assert code == 0 and len(mismatch) == 1 and str(factory) in mismatch[0], err  # one line says so


def test_api_trusts_a_matching_file_and_refuses_a_changed_one(factory_run, tmp_path, caplog):
    copy = tmp_path / "run"
    shutil.copytree(factory_run, copy)
    factory = tmp_path / "my_net.py"
    factory.write_text(FACTORY)
    config = json.loads((copy / "config.json").read_text())
    config["model"] = f"{factory}:build"
    (copy / "config.json").write_text(json.dumps(config))
    assert load_level(copy, trust_factory=True).level == 1  # same bytes as recorded: trusted
    factory.write_text(FACTORY + "\n# edited after the run\n")
    (tmp_path / "my_net.RAN").unlink()
    with pytest.raises(UntrustedFactoryError, match="changed since the run was made"):
        load_level(copy, trust_factory=True)
    assert not (tmp_path / "my_net.RAN").exists()
    with caplog.at_level(logging.WARNING, logger="compressor"):  # named explicitly: built, with one line
        loaded = load_level(copy, model=f"{factory}:build")
    assert loaded.level == 1 and (tmp_path / "my_net.RAN").exists()
    assert any("is not the file this run was made with" in r.getMessage() for r in caplog.records)


def test_a_hostile_run_dir_naming_its_own_code_runs_nothing(factory_run, tmp_path):
    """A received RUN_DIR whose config.json names a file inside it (hash consistent: the attacker
    wrote both) and a data factory: export, bench and load_level run neither."""
    hostile = tmp_path / "received"
    shutil.copytree(factory_run, hostile)
    (hostile / "evil.py").write_text(FACTORY)
    config = json.loads((hostile / "config.json").read_text())
    config.update(model=f"{hostile / 'evil.py'}:build", model_sha256=file_sha256(hostile / "evil.py"),
                  data=f"{hostile / 'evil.py'}:build")
    (hostile / "config.json").write_text(json.dumps(config))
    one_line_exit_2(edgeprune(["export", str(hostile), "--out", str(tmp_path / "md")], cwd=tmp_path))
    one_line_exit_2(edgeprune(["bench", "local", "--run", str(hostile), "--out", str(tmp_path / "b")], cwd=tmp_path))
    with pytest.raises(UntrustedFactoryError):
        load_level(hostile)
    # With the user's own factory named, the run exports; the hostile data factory is still not run.
    code, _, err = edgeprune(["export", str(hostile), "--model", f"{factory_run.parent / 'my_net.py'}:build",
                              "--out", str(tmp_path / "md")], cwd=tmp_path)
    assert code == 0, err
    assert not (hostile / "evil.RAN").exists()
    (factory_run.parent / "my_net.RAN").unlink()


def test_bench_model_override_exports_the_levels(factory_run, tmp_path):
    from benchmarks.errors import BenchError
    from benchmarks.run_levels import export_levels

    with pytest.raises(BenchError, match="--model"):
        export_levels(factory_run, "all", tmp_path)
    dirs = export_levels(factory_run, "all", tmp_path, model=f"{factory_run.parent / 'my_net.py'}:build")
    assert [d.name for d in dirs] == ["dense", "lr-rewind-level1"]
    assert all((d / "manifest.json").is_file() for d in dirs)
    (factory_run.parent / "my_net.RAN").unlink()


def test_bench_model_without_run_is_a_one_line_error(tmp_path):
    err = one_line_exit_2(edgeprune(["bench", "local", str(tmp_path), "--model", "digits-mlp",
                                     "--out", str(tmp_path / "b")], cwd=REPO))
    assert "--run" in err
