"""Tiny deterministic networks for the engine tests."""

import torch
from torch import nn


def seeded(seed: int):
    torch.manual_seed(seed)


class TinyClassifier(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> dropout -> avg-pool -> linear."""

    def __init__(self, channels: int = 3, classes: int = 5, seed: int = 0):
        super().__init__()
        seeded(seed)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.5)
        self.head = nn.Linear(8, classes)
        with torch.no_grad():  # non-trivial BN statistics
            self.features[1].running_mean.uniform_(-0.2, 0.2)
            self.features[1].running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.dropout(self.features(x))
        return self.head(x.mean(dim=(2, 3)))


class TinyEmbedder(nn.Module):
    """A small face-embedding stand-in: conv -> PReLU -> conv -> flatten -> linear (D = 8)."""

    def __init__(self, channels: int = 3, size: int = 12, dim: int = 8, seed: int = 1):
        super().__init__()
        seeded(seed)
        self.body = nn.Sequential(
            nn.Conv2d(channels, 4, 3, padding=1), nn.PReLU(4), nn.Conv2d(4, 4, 3, padding=1, stride=2)
        )
        self.fc = nn.Linear(4 * ((size + 1) // 2) ** 2, dim)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


class TinyBackbone(nn.Module):
    """Two stages so the feature-map loss can target ``stage1`` and skip ``stage2``."""

    def __init__(self, channels: int = 3, seed: int = 2):
        super().__init__()
        seeded(seed)
        self.stage1 = nn.Sequential(
            nn.Conv2d(channels, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 6, 3, stride=2, padding=1)
        )
        self.stage2 = nn.Sequential(nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1))
        self.head = nn.Linear(4, 3)
        self.unused = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(x)).mean(dim=(2, 3)))


class CappedMemory(nn.Module):
    """Wraps a model and raises the allocator's error past ``capacity`` images, recording every batch."""

    def __init__(self, model: nn.Module, capacity: int):
        super().__init__()
        self.model = model
        self.capacity = capacity
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        return self.model(x)
