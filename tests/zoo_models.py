"""Real architectures for the zoo test, as ``file.py:factory`` specs the CLIs take.

Hugging Face BERT, DistilBERT and ViT are built from tiny configs (random weights: nothing is downloaded),
next to a user CNN of the kind people write (``x.view(x.size(0), -1)``, HardSwish, depthwise convs, no
``input_shape`` attribute). The data factories yield small seeded random batches in the shapes each
model takes: ``({"input_ids", "attention_mask"}, labels)`` for the text models, ``({"pixel_values"},
labels)`` for ViT.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

VOCAB, SEQ, CLASSES = 64, 8, 3


def _text_config(**extra: Any) -> dict:
    return dict(vocab_size=VOCAB, max_position_embeddings=32, num_labels=CLASSES, **extra)


def bert() -> nn.Module:
    """BertForSequenceClassification, 2 layers of width 32 (eager attention: one plain graph)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        **_text_config())
    return BertForSequenceClassification(config)


def distilbert() -> nn.Module:
    """DistilBertForSequenceClassification, 2 layers of width 32."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **_text_config())
    return DistilBertForSequenceClassification(config)


def vit() -> nn.Module:
    """ViTForImageClassification on 3×16×16 images, 4×4 patches, 2 layers of width 32."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=CLASSES)
    return ViTForImageClassification(config)


def gpt2() -> nn.Module:
    """GPT2ForSequenceClassification, 2 layers of width 32 (HF's Conv1D projections, a tied LM table)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=VOCAB, num_labels=CLASSES,
                        pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(config)


def bart() -> nn.Module:
    """BartForSequenceClassification, 1+1 layers of width 32: an encoder-decoder (its cache is the
    EncoderDecoderCache that export must leave out). It classifies at the <eos> token (id 2)."""
    from transformers import BartConfig, BartForSequenceClassification

    config = BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                        max_position_embeddings=32, num_labels=CLASSES, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForSequenceClassification(config)


def t5() -> nn.Module:
    """T5ForSequenceClassification, 1+1 layers of width 32 (relative position buckets, no biases)."""
    from transformers import T5Config, T5ForSequenceClassification

    config = T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                      vocab_size=VOCAB, num_labels=CLASSES, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return T5ForSequenceClassification(config)


def convnext() -> nn.Module:
    """ConvNextForImageClassification on 3×16×16: depthwise 7×7 convs, LayerNorm, a bare layer-scale
    nn.Parameter per block."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=2,
                            image_size=16, num_labels=CLASSES)
    return ConvNextForImageClassification(config)


def levit() -> nn.Module:
    """LevitForImageClassification on 3×32×32: conv stem, attention with bare attention-bias tables."""
    from transformers import LevitConfig, LevitForImageClassification

    config = LevitConfig(image_size=32, num_channels=3, patch_size=16, hidden_sizes=[32, 48], num_attention_heads=[2, 2],
                         depths=[1, 1], key_dim=[8, 8], drop_path_rate=0, mlp_ratio=[2, 2],
                         attention_ratio=[2, 2], down_ops=[["Subsample", 8, 4, 4, 2, 2]], num_labels=CLASSES)
    return LevitForImageClassification(config)


def wav2vec2() -> nn.Module:
    """Wav2Vec2ForSequenceClassification on 400 raw samples: conv feature encoder, grouped positional conv."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=VOCAB,
                            num_labels=CLASSES, classifier_proj_size=16, mask_time_prob=0.0)
    return Wav2Vec2ForSequenceClassification(config)


def whisper_encoder() -> nn.Module:
    """WhisperForAudioClassification (the Whisper encoder and a head) on 8 mel bins × 32 frames."""
    from transformers import WhisperConfig, WhisperForAudioClassification

    config = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=8,
                           max_source_positions=16, vocab_size=VOCAB, num_labels=CLASSES, classifier_proj_size=16)
    return WhisperForAudioClassification(config)


class UserCNN(nn.Module):
    """A user's CNN for 1×8×8 digits: depthwise-separable blocks, HardSwish, ``x.view(x.size(0), -1)``.
    It declares no ``input_shape``: the digits data must follow its first layer (a Conv2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(),  # depthwise
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),                              # pointwise
            nn.MaxPool2d(2))
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.fc(x.view(x.size(0), -1))


def user_cnn() -> nn.Module:
    return UserCNN()


class PlainCNN(nn.Module):
    """The user CNN without HardSwish or depthwise convs (ops every runtime engine has), still with the
    ``view`` that used to break export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.reshape(-1, 8 * 8 * 8))


def pooled_cnn() -> nn.Module:
    """A CNN with global pooling: trained on 1×8×8, it runs at any resolution (export --input-shape)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def plain_cnn() -> nn.Module:
    return PlainCNN()


class TwoInputs(nn.Module):
    """Two inputs of two dtypes (features and an integer mask), a dict output: runs on the native engine."""

    input_shape = None

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, CLASSES)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict:
        hidden = torch.relu(self.fc1(features * mask.to(features.dtype)))
        return {"hidden": hidden, "logits": self.fc2(hidden)}


def two_inputs() -> nn.Module:
    return TwoInputs()


class GRUClassifier(nn.Module):
    """A user's text classifier: token ids → Embedding → 2-layer bidirectional GRU → Linear (last step)."""

    def __init__(self, cell: str = "GRU") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = getattr(nn, cell)(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(48, CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(input_ids))
        return self.fc(hidden[:, -1])


def gru_classifier() -> nn.Module:
    return GRUClassifier("GRU")


def lstm_classifier() -> nn.Module:
    return GRUClassifier("LSTM")


def ids_data():
    """(train, test): random token id sequences [8, SEQ] (int64) as one positional input."""
    make = lambda batch, g: torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    return _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)


def _batches(make_inputs, count: int, batch: int, seed: int) -> List[Tuple[Any, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(make_inputs(batch, generator), torch.randint(0, CLASSES, (batch,), generator=generator))
            for _ in range(count)]


def _text(batch: int, generator: torch.Generator) -> dict:
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=generator)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[:, SEQ - 2:] = torch.randint(0, 2, (batch, 2), generator=generator)  # some padding
    return {"input_ids": ids, "attention_mask": mask}


def eos_text_data():
    """text_data whose sequences end with the <eos> token (id 2) and contain no other: BART and T5
    classify at it. Padding-free, so every sequence has exactly one."""
    def make(batch: int, generator: torch.Generator) -> dict:
        ids = torch.randint(3, VOCAB, (batch, SEQ), generator=generator)
        ids[:, -1] = 2
        return {"input_ids": ids, "attention_mask": torch.ones(batch, SEQ, dtype=torch.long)}
    return _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)


def t5_text_data():
    """eos_text_data with T5's <eos> (id 1)."""
    def retag(batches):
        return [({"input_ids": torch.where(x["input_ids"] == 2, 1, x["input_ids"]),
                  "attention_mask": x["attention_mask"]}, y) for x, y in batches]
    train, test = eos_text_data()
    return retag(train), retag(test)


def audio_data():
    """(train, test): 400 random raw samples per example (``input_values``) for wav2vec2."""
    make = lambda batch, g: {"input_values": torch.randn(batch, 400, generator=g)}
    return _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)


def mel_data():
    """(train, test): random log-mel features [8 bins, 32 frames] (``input_features``) for Whisper."""
    make = lambda batch, g: {"input_features": torch.randn(batch, 8, 32, generator=g)}
    return _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)


def small_image_data():
    """(train, test): random 3×16×16 ``pixel_values`` (ConvNeXt)."""
    return image_data()


def levit_image_data():
    """(train, test): random 3×32×32 ``pixel_values`` (LeViT)."""
    make = lambda batch, g: {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    return _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)


def text_data():
    """(train, test): 4 + 1 batches of 8 random token sequences with attention masks."""
    return _batches(_text, 4, 8, 0), _batches(_text, 1, 8, 1)


class _Examples(torch.utils.data.Dataset):
    """A map-style dataset of ({"input_ids", "attention_mask"}, label) examples (torch collates dicts)."""

    def __init__(self, batches: List[Tuple[Any, torch.Tensor]]) -> None:
        self.items = [({k: v[i] for k, v in inputs.items()}, labels[i])
                      for inputs, labels in batches for i in range(len(labels))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Any, torch.Tensor]:
        return self.items[index]


def text_dataset():
    """text_data as map-style datasets of single examples (batched by the compressor)."""
    train, test = text_data()
    return _Examples(train), _Examples(test)


def image_data():
    """(train, test): random 3×16×16 ``pixel_values`` for ViT."""
    make = lambda batch, g: {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)


def random_digits():
    """(train, test): random 1×8×8 images with 10 classes, shaped like the digits."""
    def make(batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(batch, 1, 8, 8, generator=generator)
    train, test = _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)
    relabel = lambda batches: [(x, y % 10) for x, y in batches]
    return relabel(train), relabel(test)


def not_pairs():
    """A broken data factory: its batches are bare tensors, not (inputs, target) pairs."""
    return [torch.rand(8, 1, 8, 8)], [torch.rand(8, 1, 8, 8)]


def pair_data():
    """(train, test) for TwoInputs: positional (features, mask) tuples."""
    make = lambda batch, g: (torch.randn(batch, 16, generator=g), torch.randint(0, 2, (batch, 16), generator=g))
    return _batches(make, 4, 8, 0), _batches(make, 1, 8, 1)


def _regression(batch: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 16, generator=generator), torch.ones(batch, 16, dtype=torch.long)


def _with_targets(batches: List[Tuple[Any, torch.Tensor]]) -> List[Tuple[Any, torch.Tensor]]:
    """Float regression targets [N, 3] instead of class labels."""
    return [(inputs, torch.stack([y.float(), -y.float(), y.float() / 2], 1)) for inputs, y in batches]


def regression_data():
    """(train, test) for TwoInputs with float targets: needs --loss mse (or l1)."""
    return _with_targets(_batches(_regression, 4, 8, 0)), _with_targets(_batches(_regression, 1, 8, 1))


def regression_with_loss():
    """(train, test, loss): the factory brings its own loss (smooth L1) for the float targets."""
    train, test = regression_data()
    return train, test, torch.nn.functional.smooth_l1_loss
