"""A third-party classifier that knows nothing of fame, for README "Your own model" (tests/test_own_model.py).

``build(classes)`` returns a plain ``nn.Module`` taking [0, 1] RGB images and returning logits. Its one
``act`` module runs after each convolution, so it is no valid target layer (it runs twice per forward pass).
"""

from __future__ import annotations

import torch
from torch import nn


class TwoConvNet(nn.Module):
    """conv - act - conv - act - average pool - linear, seeded so every process builds the same weights."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, width, 3, padding=1)
        self.second = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.act = nn.ReLU()
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.act(self.second(self.act(self.first(images))))
        return self.head(features.mean(dim=(2, 3)))


def build(classes: int = 2, seed: int = 0) -> TwoConvNet:
    """The network with weights drawn from ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = TwoConvNet(classes)
    torch.random.set_rng_state(generator_state)
    return net.eval()
