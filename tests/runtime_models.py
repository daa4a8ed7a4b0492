"""Small PyTorch models for the export/runtime tests (imports torch; the runtime tests never import it).

Besides the built-in registry models: a user-style CNN with residual adds, concat, average pooling
and softmax; a transformer-style MLP block (LayerNorm, GELU, 3-D MatMul, residual); and a model with
HardSwish; and a model with an op the native runtime does not implement (CumSum) to exercise the
fallback/error paths.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.train.models import build_model


class ResidualCNN(nn.Module):
    input_shape = (3, 12, 12)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_a = nn.Conv2d(16, 16, 3, padding=1)
        self.branch_b = nn.Conv2d(16, 8, 1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.mpool = nn.MaxPool2d(2, ceil_mode=True)
        self.mix = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(24 * 2 * 2, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.branch_a(x))                        # residual Add
        x = torch.cat([x, self.branch_b(x)], dim=1)                 # Concat
        x = self.mpool(self.pool(x))
        x = torch.relu(self.mix(x))
        return torch.softmax(self.head(x.flatten(1)), dim=1)


class MlpBlock(nn.Module):
    """x + W2·GELU(W1·LayerNorm(x)) over a [batch, tokens, dim] input."""

    def __init__(self, dim: int = 64, hidden: int = 256, tokens: int = 4) -> None:
        super().__init__()
        self.input_shape = (tokens, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class HardSwishNet(nn.Module):
    input_shape = (16,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.hardswish(self.fc1(x)))


class MobileCNN(nn.Module):
    """MobileNetV3-style pieces: depthwise and grouped convs, HardSwish, a squeeze-excite gate with
    HardSigmoid, and pools with ceil_mode (AvgPool counting its padding)."""

    input_shape = (3, 17, 17)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.grouped = nn.Conv2d(16, 24, 3, stride=2, padding=1, groups=4)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=True)
        self.mpool = nn.MaxPool2d(2, ceil_mode=True)
        self.head = nn.Linear(24 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.stem(x))
        gate = nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = nn.functional.hardswish(self.grouped(x * gate))
        return self.head(self.mpool(self.pool(x)).flatten(1))


class CumSumNet(nn.Module):
    input_shape = (16,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cumsum(self.fc1(x), dim=1))


def wide_mlp(width: int = 4096, inputs: int = 1024, classes: int = 10) -> nn.Module:
    model = nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, classes))
    model.input_shape = (inputs,)
    return model


def make(name: str) -> nn.Module:
    """A model by test name, with random (seeded) weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    factories = {"residual-cnn": ResidualCNN, "mlp-block": MlpBlock, "hardswish": HardSwishNet,
                 "cumsum": CumSumNet, "mobile-cnn": MobileCNN}
    model = factories[name]() if name in factories else build_model(name)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # trained-looking stats, so folding is really tested
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model.eval()


def prune_global(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the smallest-magnitude weights of every conv/linear weight (one global threshold)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if sparsity <= 0:
        return model
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    threshold = magnitudes.kthvalue(max(1, int(sparsity * magnitudes.numel()))).values
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return model
