"""Export problems are known before training: a model torch cannot export is one warning line at the
start of the run; Hugging Face decoders (GPT-2, BART: a DynamicCache / EncoderDecoderCache in their
output) export with use_cache=False and only the chosen output, after compressing as before."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.config import PruneConfig
from compressor.export.model_dir import export_model
from compressor.pipeline import compress
from edge_runtime import InferenceSession
from tests import zoo_models

pytest.importorskip("transformers")


class Unexportable(nn.Module):
    """Trains fine, but aten::special_zeta has no ONNX export."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(features) + torch.special.zeta(features[:, :3].abs() + 2.0, torch.ones(1, 3))


def test_a_model_torch_cannot_export_is_one_warning_before_training(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    train, test = zoo_models.pair_data()
    config = PruneConfig(epochs=1, target_sparsity=0.5, one_shot=True, lr=0.01, batch_size=8)
    epochs = []
    with caplog.at_level(logging.INFO, logger="compressor"):
        compress(Unexportable(), train, test, config, epoch_callback=lambda *a: epochs.append(a), progress=False)
    messages = [r.getMessage() for r in caplog.records]
    warned = [i for i, m in enumerate(messages) if "cannot be exported to ONNX" in m]
    assert len(warned) == 1 and "special_zeta" in messages[warned[0]] and "\n" not in messages[warned[0]]
    first_level = next(i for i, m in enumerate(messages) if "dense done" in m)
    assert warned[0] < first_level  # said before anything was trained


@pytest.mark.parametrize("model, data", [("gpt2", "text_data"), ("bart", "eos_text_data")])
def test_hugging_face_decoders_compress_then_export(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     model: str, data: str) -> None:
    torch.manual_seed(0)
    network = getattr(zoo_models, model)()
    assert network.config.use_cache  # as built: a cache in every output
    train, test = getattr(zoo_models, data)()
    config = PruneConfig(epochs=1, target_sparsity=0.5, one_shot=True, lr=0.01, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="compressor"):
        compress(network, train[:1], test, config)
    assert not any("cannot be exported" in r.getMessage() for r in caplog.records)
    inputs = test[0][0]
    sample = {k: v[:2].numpy() for k, v in inputs.items()}
    export_model(network.eval(), tmp_path / "model", sample=sample)
    assert network.config.use_cache  # the caller's setting is back
    with torch.no_grad():
        expected = network(**inputs).logits.numpy()
    session = InferenceSession(tmp_path / "model", kernels="auto", threads=1)
    got = session.run(None, {k: v.numpy() for k, v in inputs.items() if k in
                             {i.name for i in session.get_inputs()}})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def _cli(*argv) -> int:
    from edgeprune.cli import main

    return main([str(a) for a in argv])


def test_a_run_exports_at_the_resolution_the_device_runs(tmp_path: Path) -> None:
    """A CNN trained on 8×8 images exported at 1×32×32 with --input-shape (RUN_DIR + --input-shape)."""
    zoo = Path(zoo_models.__file__)
    run_dir = tmp_path / "run"
    assert _cli("compress", "--model", f"{zoo}:pooled_cnn", "--data", f"{zoo}:random_digits", "--epochs", 1,
                "--target-sparsity", 0.5, "--one-shot", "--lr", 0.01, "--out", run_dir) == 0
    assert _cli("export", run_dir, "--out", tmp_path / "m", "--model", f"{zoo}:pooled_cnn",
                "--input-shape", "1,32,32") == 0
    import json

    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["input"]["shape"] == ["batch", 1, 32, 32]
    session = InferenceSession(tmp_path / "m", kernels="auto", threads=1)
    assert session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 32, 32), np.float32)})[0].shape == (2, 10)


def test_a_token_model_exported_without_its_data_is_told_to_pass_data(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    zoo = Path(zoo_models.__file__)
    run_dir = tmp_path / "run"
    assert _cli("compress", "--model", f"{zoo}:gru_classifier", "--data", f"{zoo}:ids_data", "--epochs", 1,
                "--target-sparsity", 0.5, "--one-shot", "--lr", 0.01, "--out", run_dir) == 0
    capsys.readouterr()
    assert _cli("export", run_dir, "--out", tmp_path / "m", "--model", f"{zoo}:gru_classifier") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--data {zoo}:ids_data" in err and "Traceback" not in err
