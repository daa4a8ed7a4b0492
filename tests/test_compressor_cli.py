"""``edgeprune compress`` from the outside: results written, bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgeprune.cli import main
from tests.compressor_fixtures import REPO, TEMP_ROOT, TINY_ARGS, final, one_thread, shared_run, tree_snapshot


def _fail(capsys, args):
    """Run the real CLI in-process; assert the user-error contract; return the message."""
    with one_thread():
        code = main(["compress", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("edgeprune compress: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def factories(tmp_path):
    (tmp_path / "models.py").write_text(
        "import torch\n"
        "def not_a_module():\n    return 42\n"
        "def broken():\n    raise ValueError('boom')\n")
    (tmp_path / "data.py").write_text(
        "import torch\n"
        "def one_thing():\n    return torch.zeros(3)\n"
        "def numbers():\n    return 1, 2\n")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "missing/file.py:build"], "factory file not found"),
    (["--model", "{d}/models.py:not_a_module"], "returned int, not a torch.nn.Module"),
    (["--model", "{d}/models.py:broken"], "raised ValueError: boom"),
    (["--model", "{d}/models.py:nothing"], "no callable named 'nothing'"),
    (["--data", "{d}/data.py:one_thing"], "must return (train, test)"),
    (["--data", "{d}/data.py:numbers"], "not a loader or dataset"),
    (["--data", "imagenet"], "unknown data 'imagenet'"),
    (["--data", "cifar10:{d}/nowhere"], "CIFAR-10 folder not found"),
    (["--target-sparsity", "1.5"], "target sparsity must be in (0, 1)"),
    (["--target-sparsity", "0"], "target sparsity must be in (0, 1)"),
    (["--method", "lr-rewind,magic"], "unknown method 'magic'"),
    (["--exclude", "net.9"], "no prunable layer named 'net.9'"),
    (["--lr-drops", "a,b"], "--lr-drops must be comma separated epochs"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(capsys, factories, args, message):
    out = factories / "run"
    err = _fail(capsys, [*TINY_ARGS, "--out", str(out)] + [a.replace("{d}", str(factories)) for a in args])
    assert message in err
    assert not out.exists()


def test_corrupt_or_foreign_pretrained_checkpoint_is_refused(capsys, tmp_path):
    good = shared_run() / "dense" / "final.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    for path, message in ((truncated, "not a readable PyTorch checkpoint"), (text, "not a readable"),
                          (wrong, "does not fit the model"), (tmp_path / "absent.pt", "not found")):
        err = _fail(capsys, ["--pretrained", str(path), "--out", str(tmp_path / "run"), *TINY_ARGS])
        assert message in err
    assert not (tmp_path / "run").exists()


def test_foreign_run_dir_is_refused_untouched(capsys, tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    before = tree_snapshot(foreign)
    assert "is not empty" in _fail(capsys, ["--out", str(foreign), *TINY_ARGS])
    assert "not an edgeprune run" in _fail(capsys, ["--out", str(foreign), "--resume", *TINY_ARGS])
    assert tree_snapshot(foreign) == before


def test_pretrained_start_skips_dense_training(capsys):
    out = TEMP_ROOT / "pretrained"
    dense = shared_run() / "dense" / "final.pt"
    with one_thread():
        code = main(["compress", "--out", str(out), "--pretrained", str(dense), *TINY_ARGS,
                     "--target-sparsity", "0.2"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    level0, level1 = metrics["methods"]["lr-rewind"]
    assert level0["epochs"] == 0 and level0["accuracy"] == final(shared_run(), "dense", 0)["accuracy"]
    assert level1["sparsity"] == pytest.approx(0.2, abs=1e-4)
    assert "Traceback" not in capsys.readouterr().err


def test_results_files_follow_the_run_dir_contract():
    run = shared_run()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "digits-mlp" and metrics["data"] == "digits"
    assert list(metrics["methods"]) == ["lr-rewind", "finetune", "weight-rewind"]
    for levels in metrics["methods"].values():
        assert [e["level"] for e in levels] == [0, 1, 2, 3, 4]
        for entry in levels:
            # (sparsity_all joins them where all parameters' zeros are reported beside the prunable ones')
            assert {"level", "sparsity", "accuracy", "loss", "epochs", "seconds", "test_examples"} <= set(entry)
            assert 0.0 <= entry["accuracy"] <= 1.0
            # the accuracy's resolution: a whole number of the test set's examples
            assert entry["test_examples"] > 100
            assert entry["accuracy"] * entry["test_examples"] == pytest.approx(round(entry["accuracy"] * entry["test_examples"]))
    assert metrics["methods"]["lr-rewind"][0] == metrics["methods"]["finetune"][0]  # one shared dense level
    config = json.loads((run / "config.json").read_text())
    assert config["methods"] == ["lr-rewind", "finetune", "weight-rewind"] and config["epochs"] == 3
    report = (run / "report.md").read_text()
    assert report.count("| weight-rewind |") == 5
    assert (run / "sparsity_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = final(run, "finetune", 2)  # plain tensors and builtins only: weights_only loads it
    assert {"model", "mask", "level", "method", "sparsity", "accuracy", "loss"} <= set(saved)
    assert saved["level"] == 2 and saved["method"] == "finetune"


def test_cli_module_does_not_import_torch():
    code = ("import sys, edgeprune.cli, compressor.compress_cli, argparse\n"
            "compressor.compress_cli.configure(argparse.ArgumentParser())\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.slow
def test_without_a_terminal_compress_logs_a_line_per_level_and_ctrl_c_says_how_to_resume(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = [a for a in TINY_ARGS if a != "--no-progress"]  # the default: plain lines when not a terminal
    command = [sys.executable, "-m", "edgeprune", "compress", *args, "--epochs", "40", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    # level 1 under way: the dense level's line was written before it began
    while not (out / "lr-rewind").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "dense done: sparsity 0.00%" in err and "dense: epoch 10/40" in err  # stderr was a pipe
    assert "--resume" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_help_lists_every_built_in_model():
    from compressor.config import MODEL_NAMES
    from compressor.train.models import BUILTIN

    assert set(MODEL_NAMES) == set(BUILTIN)  # the torch-free list --help shows is the real one
    done = subprocess.run([sys.executable, "-m", "edgeprune", "compress", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert all(name in " ".join(done.stdout.split()) for name in MODEL_NAMES)


def test_the_python_api_says_a_line_per_level_when_stderr_is_no_terminal(capsys, tmp_path):
    from tests.compressor_fixtures import run_tiny

    run_tiny(tmp_path / "run", progress=None, target_sparsity=0.2, epochs=1, lr_drops=())  # the API's default
    err = capsys.readouterr().err  # pytest's capture: not a terminal, as in a notebook's log or a pipe
    assert "dense done: sparsity 0.00%" in err and "lr-rewind level 1 done: sparsity 20.00%" in err
    from compressor.pipeline import compress  # progress=False: quiet
    from tests.compressor_fixtures import tiny_config
    from compressor.train.data import load_data
    from compressor.train.models import build_model

    train, test = load_data("digits", (64,), 64, 3)
    compress(build_model("digits-mlp"), train, test, tiny_config(target_sparsity=0.2, epochs=1, lr_drops=()),
             device="cpu", progress=False)
    assert "done:" not in capsys.readouterr().err
