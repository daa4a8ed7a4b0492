"""--structure channels traces the run's real data: token ids into an Embedding, keyword (dict) inputs
and models returning a Hugging Face-style cache object; a bare ``nn.Parameter`` (a layer scale) is
Torch-Pruning's unwrapped parameter, not "off the autograd path"; channels whose removal breaks the
model (attention heads) stay whole. Readers rebuild the levels from the example the run stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.config import PruneConfig
from compressor.export.model_dir import export_model
from compressor.pipeline import compress
from compressor.prune.channels import find_groups
from compressor.prune.examples import first_example
from compressor.run.run_dir import load_level
from edge_runtime import InferenceSession

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
