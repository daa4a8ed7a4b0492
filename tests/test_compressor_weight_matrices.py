"""Every weight matrix a user expects is pruned (Embedding, RNN/GRU/LSTM, attention projections), the
sparsity is reported over the prunable weights *and* over all parameters, and large tensors left dense
are named in one warning line. A GRU text classifier then exports with its GRU and Embedding weights as
CSR and runs in the runtime (onnxruntime: the native engines have no GRU, and ``auto`` falls back)."""

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
from compressor.prune.weights import dense_leftovers, prunable_parameters
from edge_runtime import InferenceSession
from edge_runtime.errors import UnsupportedOpError
from tests import zoo_models


def test_embedding_rnn_and_attention_weights_are_prunable_in_every_layer_and_direction() -> None:
    lstm = zoo_models.lstm_classifier()
    names = set(prunable_parameters(lstm))
    rnn = {f"rnn.weight_{kind}_l{layer}{direction}" for kind in ("ih", "hh") for layer in (0, 1)
           for direction in ("", "_reverse")}
    assert names == {"embed.weight", "fc.weight", *rnn}
    # --exclude takes a module (all of its weights) or one parameter
    assert set(prunable_parameters(lstm, exclude=("rnn",))) == {"embed.weight", "fc.weight"}
    assert set(prunable_parameters(lstm, exclude=("rnn.weight_hh_l1",))) == names - {"rnn.weight_hh_l1"}
    attention = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    assert set(prunable_parameters(attention)) == {"self_attn.in_proj_weight", "self_attn.out_proj.weight",
                                                   "linear1.weight", "linear2.weight"}
    split = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)  # separate q/k/v projections
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight"} <= set(prunable_parameters(split))


def test_a_tied_weight_is_pruned_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # a language model's tied input/output embedding
    assert list(prunable_parameters(model)) == ["0.weight"]


class _BigBias(nn.Module):
    """A model whose largest tensor is a bare parameter (a position table), not a weight matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(64, 16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x + self.table.mean(0))


def test_large_tensors_left_dense_are_named_in_one_line() -> None:
    model = _BigBias()
    line = dense_leftovers(model, prunable_parameters(model))
    assert line is not None and "\n" not in line and "table (1,024)" in line
    gru = zoo_models.gru_classifier()
    assert dense_leftovers(gru, prunable_parameters(gru)) is None  # everything large is pruned


def test_a_gru_classifier_reaches_the_target_over_its_weights_and_runs_after_export(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = zoo_models.gru_classifier()
    train, test = zoo_models.ids_data()
    config = PruneConfig(epochs=1, target_sparsity=0.8, one_shot=True, lr=0.01, batch_size=8)
    with caplog.at_level(logging.INFO, logger="compressor"):
        result = compress(model, train, test, config, out=tmp_path / "run")
    final = result.final()
    assert final["sparsity"] == pytest.approx(0.8, abs=1e-3)
    every = torch.cat([p.detach().flatten() for p in model.parameters()])
    zeros = float((every == 0).float().mean())
    assert final["sparsity_all"] == pytest.approx(zeros, abs=1e-6) and zeros > 0.7  # biases stay dense
    assert float((model.rnn.weight_hh_l1_reverse == 0).float().mean()) > 0.5
    report = (tmp_path / "run" / "report.md").read_text()
    assert "sparsity (prunable weights)" in report and "sparsity (all parameters)" in report
    assert any("of the prunable weights" in r.getMessage() and "of all parameters" in r.getMessage()
               for r in caplog.records)

    ids = test[0][0][:2].numpy()
    exported = export_model(model.eval(), tmp_path / "model", sample=ids)
    ops = {layer["op"]: layer["storage"] for layer in exported.layers}
    assert ops["GRU"] == "csr" and "Gather" in ops
    fresh = torch.randint(0, zoo_models.VOCAB, (3, zoo_models.SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(fresh).numpy()
    for kernels in ("auto", "ort", "sparse"):
        try:
            session = InferenceSession(tmp_path / "model", kernels=kernels, threads=1)
        except UnsupportedOpError as error:
            assert kernels == "sparse" and "GRU" in str(error)  # the native engines refuse, naming the op
            continue
        got = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})[0]
        session.close()
        np.testing.assert_allclose(got, expected, atol=1e-4)
