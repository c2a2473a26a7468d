"""Small real torch.nn models and synthetic batches for behaviour tests."""

from __future__ import annotations

import torch
from torch import nn


class TiedLanguageModel(nn.Module):
    """Embedding and output projection sharing one weight (as GPT-2 ties them)."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


class TinyTransformer(nn.Module):
    def __init__(self, width: int = 32, layers: int = 2, classes: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


MODELS = {
    "mlp": mlp,
    "transformer": TinyTransformer,
    "convnet": convnet,
    "tied_embedding": TiedLanguageModel,
}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def loss_of(name: str, model: nn.Module, step: int) -> torch.Tensor:
    """The loss of ``model`` on a deterministic synthetic batch for ``step`` (drawn on the CPU,
    then moved to the model's device, so CPU and CUDA runs see the same batch)."""
    g = torch.Generator().manual_seed(1000 + step)
    device = next(model.parameters()).device
    if name == "mlp":
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    elif name == "transformer":
        x, y = torch.randn(8, 5, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    elif name == "convnet":
        x, y = torch.randn(6, 3, 10, 10, generator=g), torch.randint(0, 4, (6,), generator=g)
    else:
        tokens = torch.randint(0, 50, (8, 6), generator=g).to(device)
        return nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 50), tokens[:, 1:].reshape(-1))
    return nn.functional.cross_entropy(model(x.to(device)), y.to(device))
