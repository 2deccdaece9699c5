"""A small CNN for the synthetic default: trains in about a minute on two CPU cores."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four stages of conv blocks, global average pooling and a linear classifier.

    Takes [0, 1] images and normalizes them inside (``mean``/``std`` buffers), so explainers perturb
    pixels. Each stage after the first halves the resolution; ``stages[-1]`` is the last layer
    with spatial meaning (the Grad-CAM target, 1/8 of the input size).
    """

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 96),
        in_channels: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean and std need {in_channels} values each, got {list(mean)} and {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        stages, channels = [], in_channels
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(conv_block(channels, width, stride), conv_block(width, width)))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    @property
    def target_layer(self) -> nn.Module:
        """The last convolutional stage: the layer Grad-CAM and feature-map FAME look at."""
        return self.stages[-1]

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"SmallCNN expects images of shape (B, {self.mean.shape[1]}, H, W), got {tuple(images.shape)}"
            )
        features = self.stages((images - self.mean) / self.std)
        return self.classifier(self.dropout(self.pool(features).flatten(1)))
