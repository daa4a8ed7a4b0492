"""--structure channels traces the run's real data: token ids into an Embedding, keyword (dict) inputs
and models returning a Hugging Face-style cache object; a bare ``nn.Parameter`` (a layer scale) is
Torch-Pruning's unwrapped parameter, not "off the autograd path"; channels whose removal breaks the
model (attention heads) stay whole. Readers rebuild the levels from the example the run stored. GPT-2,
LeViT and GRU/LSTM models (tests/zoo_models.py) lose parameters by channels and run exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
from torch import nn

from compressor.config import PruneConfig
from compressor.export.model_dir import export_model
from compressor.pipeline import compress
from compressor.prune.channels import find_groups, full_plan, shrink, widths
from compressor.prune.examples import first_example
from compressor.run.run_dir import load_level
from compressor.train.batches import call_model, pick_output
from edge_runtime import InferenceSession
from tests import zoo_models

VOCAB, SEQ = 32, 6


class _Cache:
    """Stands in for transformers' DynamicCache: a non-tensor in the model's output."""


class TokenModel(nn.Module):
    """Keyword inputs (input_ids int64, attention_mask), an Embedding first, attention-like heads whose
    projection is reshaped into 2 heads, a layer-scale parameter, a dict output with a cache object."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.value = nn.Linear(16, 16)  # viewed as [B, T, 2, 8]: a channel less breaks the view
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)
        self.scale = nn.Parameter(torch.full((16,), 0.5))  # ConvNeXt's layer scale: a bare parameter
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        x = self.embed(input_ids) * attention_mask.unsqueeze(-1).float()
        heads = self.value(x).view(x.shape[0], x.shape[1], 2, 8)
        x = x + heads.flatten(2)
        x = x + self.scale * self.down(torch.relu(self.up(x)))
        return {"logits": self.head(x.mean(1)), "past_key_values": _Cache()}


def _data(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [({"input_ids": torch.randint(0, VOCAB, (8, SEQ), generator=generator),
              "attention_mask": torch.ones(8, SEQ, dtype=torch.long)},
             torch.randint(0, 3, (8,), generator=generator)) for _ in range(count)]


def test_groups_come_from_a_real_batch_and_breaking_ones_stay_whole() -> None:
    model = TokenModel()
    example = first_example(_data(1, 0)[0][0])
    assert example["input_ids"].dtype == torch.int64 and example["input_ids"].shape == (1, SEQ)
    roots = {g.root for g in find_groups(model, example)}
    assert roots == {"up"}  # value's channels are heads (kept whole); down's feed the residual with embed


def test_a_token_model_with_keyword_inputs_compresses_by_channels_and_reloads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TokenModel()
    config = PruneConfig(epochs=1, target_sparsity=0.1, one_shot=True, lr=0.01, batch_size=8, structure="channels")
    result = compress(model, _data(2, 0), _data(1, 1), config, out=tmp_path / "run")
    final = result.final()
    assert final["sparsity"] >= 0.1 and final["widths"]["up"] < 32
    level = load_level(tmp_path / "run", model=f"{__file__}:TokenModel")  # rebuilt with the stored example
    assert level.model.up.out_features == final["widths"]["up"]
    inputs = _data(1, 2)[0][0]
    with torch.no_grad():
        expected = level.model(**inputs)["logits"].numpy()
    sample = {k: v[:2].numpy() for k, v in inputs.items()}
    export_model(level.model, tmp_path / "model", sample=sample, output="logits")
    session = InferenceSession(tmp_path / "model", kernels="auto", threads=1)
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def _needs(module: str) -> Any:
    try:
        __import__(module)
        return pytest.mark.skipif(False, reason="")
    except ImportError:
        return pytest.mark.skip(reason=f"{module} is not installed (test extra)")


# model and data factories of tests/zoo_models.py, and the layer whose width the level must have cut
ZOO_CASES = [
    pytest.param("gpt2", "text_data", "transformer.h.0.mlp.c_fc", id="hf-gpt2-conv1d-no-cache",
                 marks=_needs("transformers")),
    pytest.param("levit", "levit_image_data", None, id="hf-levit-channels-last-slice", marks=_needs("transformers")),
    pytest.param("gru_classifier", "ids_data", "rnn", id="gru-2-layers-bidirectional"),
    pytest.param("lstm_classifier", "ids_data", "rnn", id="lstm-2-layers-bidirectional"),
]


@pytest.mark.parametrize("name, data, narrowed", ZOO_CASES)
def test_zoo_models_compress_by_channels_export_and_run(tmp_path: Path, name: str, data: str,
                                                        narrowed: Optional[str]) -> None:
    """GPT-2 (HF Conv1D, traced without its key/value cache), LeViT, and GRU/LSTM text classifiers lose
    parameters by channels; the exported level runs in edge_runtime as in PyTorch."""
    torch.manual_seed(0)
    model = getattr(zoo_models, name)()
    dense = sum(p.numel() for p in model.parameters())
    train, test = getattr(zoo_models, data)()
    config = PruneConfig(epochs=1, target_sparsity=0.2, one_shot=True, lr=0.01, batch_size=8, structure="channels")
    result = compress(model, train[:2], test, config, out=tmp_path / "run")
    level = result.model.eval()
    final = result.final()
    assert sum(p.numel() for p in level.parameters()) == final["params"] <= 0.8 * dense  # physically removed
    if narrowed is not None:
        assert final["widths"][narrowed] < widths(getattr(zoo_models, name)())[narrowed]
    inputs, _ = test[0]
    inputs = {k: v[:3] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:3]
    with torch.no_grad():
        expected = pick_output(call_model(level, inputs))[1].numpy()
    sample = {k: v[:2].numpy() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:2].numpy()
    export_model(level, tmp_path / "model", sample=sample)
    for kernels in ("ort", "auto"):
        session = InferenceSession(tmp_path / "model", kernels=kernels, threads=1)
        names = [arg.name for arg in session.get_inputs()]
        feed = {n: inputs[n].numpy() for n in names} if isinstance(inputs, dict) else {names[0]: inputs.numpy()}
        np.testing.assert_allclose(session.run(None, feed)[0], expected, atol=1e-4)
        session.close()


@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_removing_silent_rnn_units_changes_nothing(cell: str) -> None:
    """Hidden units whose outgoing weights are zero (the recurrent ones, the next layer's and the head's
    columns, in both directions) can go: the pruned RNN computes what the dense one did, so every gate,
    layer and direction was cut at the right rows and columns."""
    torch.manual_seed(0)
    model = zoo_models.GRUClassifier(cell)
    example = first_example(zoo_models.ids_data()[0][0][0])
    groups = {g.root: g for g in find_groups(model, example)}
    assert groups["rnn"].size == 48 and groups["rnn"].blocks == 2 and "embed" in groups
    hidden, silent = 24, [1, 5, 6, 20]
    with torch.no_grad():
        for name, param in model.rnn.named_parameters():
            if name.startswith("weight_hh"):
                param[:, silent] = 0
            elif name.startswith("weight_ih_l1"):
                param[:, silent + [hidden + u for u in silent]] = 0
        model.fc.weight[:, silent + [hidden + u for u in silent]] = 0
    ids = torch.randint(0, zoo_models.VOCAB, (3, zoo_models.SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    plan = full_plan(groups.values())
    kept = [u for u in range(hidden) if u not in silent]
    shrink(model, plan, {**plan, "rnn": kept + [hidden + u for u in kept]}, example)
    assert model.rnn.hidden_size == len(kept) and model.fc.in_features == 2 * len(kept)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-6)


@_needs("transformers")
def test_levit_residual_channels_go_past_a_strided_channels_last_slice() -> None:
    """LeViT subsamples queries with ``view(B, H, W, C)[:, ::2, ::2]``; Torch-Pruning took that slice for
    one of channels (NCHW), so the residual stream's removal broke the model past one channel."""
    torch.manual_seed(0)
    model = zoo_models.levit()
    example = first_example(zoo_models.levit_image_data()[0][0][0])
    root = "levit.encoder.stages.0.layers.1.module.linear_down.linear"
    groups = find_groups(model, example)
    assert root in {g.root for g in groups}
    plan = full_plan(groups)
    shrink(model, plan, {**plan, root: list(range(0, 32, 2))}, example)  # half the stream, every other one
    assert model.levit.encoder.stages[0].layers[1].module.linear_down.linear.out_features == 16
    with torch.no_grad():
        assert model.eval()(**example).logits.shape == (1, zoo_models.CLASSES)
