"""The sticker model: a small CNN whose penultimate layer is a reusable sketch embedding.

Module paths (what the exporter names layers after): ``features.conv1`` .. ``features.conv3``,
``embedding.fc``, ``classifier``.  Input: (B, 1, 28, 28) floats in [0, 1].
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

EMBEDDING_DIM = 128


def _block(cin: int, cout: int) -> list[tuple[str, nn.Module]]:
    return [("conv", nn.Conv2d(cin, cout, 3, padding=1)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2))]


class StickerNet(nn.Module):
    """3x[conv3x3 pad1 + ReLU + maxpool2] (1->16->32->64) -> 576 -> Linear 128 + ReLU -> classes."""

    def __init__(self, num_classes: int, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        layers = []
        for i, (cin, cout) in enumerate([(1, 16), (16, 32), (32, 64)], 1):
            layers += [(f"{n}{i}", m) for n, m in _block(cin, cout)]
        self.features = nn.Sequential(OrderedDict(layers))
        self.embedding = nn.Sequential(OrderedDict(
            [("flatten", nn.Flatten()), ("fc", nn.Linear(64 * 3 * 3, embedding_dim)), ("relu", nn.ReLU())]))
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(self.features(x)))


def embedding_net(model: StickerNet) -> nn.Sequential:
    """The network up to the 128-d embedding (shares the model's modules; for the kNN pipeline)."""
    return nn.Sequential(OrderedDict([("features", model.features), ("embedding", model.embedding)]))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1] (the model's input scaling 1/255)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)


@torch.no_grad()
def embed(model: StickerNet, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """128-d embeddings of uint8 images, as a float32 numpy array."""
    net = embedding_net(model).eval()
    x = to_tensor(images)
    return torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def extend_classifier(model: StickerNet, extra: int) -> StickerNet:
    """Give the head ``extra`` more output rows, all zero, for stickers a user adds later.

    A Core ML classifier cannot grow labels during an update, so the updatable head is exported
    with rows for the new stickers already in place; at zero they never win before the update.
    Works in place and returns the model.
    """
    old = model.classifier
    head = nn.Linear(old.in_features, old.out_features + extra)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[:old.out_features] = old.weight
        head.bias[:old.out_features] = old.bias
    model.classifier = head
    return model
