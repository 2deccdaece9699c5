"""IResNet face backbones in the layout and key names of insightface's arcface_torch checkpoints.

Definition (the "improved residual" networks of Deng et al., ArcFace, CVPR 2019): a 3x3 stem
conv-BN-PReLU, four stages of pre-activation basic blocks BN-conv3x3-BN-PReLU-conv3x3(stride)-BN
whose first block halves the resolution (with a 1x1 conv-BN shortcut), then BN, flatten, dropout,
a linear layer to the embedding and a BatchNorm1d whose scale is fixed to 1. A 112x112 crop ends
as 7x7 cells. Keys: ``conv1, bn1, prelu, layer1..4.N.{bn1, conv1, bn2, prelu, conv2, bn3,
downsample.0, downsample.1}, bn2, fc, features``.
"""

from __future__ import annotations

from torch import Tensor, nn

#: Blocks per stage of the arcface_torch depths.
IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
IRESNET_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN plus the shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet on (B, 3, input_size, input_size) normalized RGB crops, returning (B, embedding_size).

    ``layers`` are blocks per stage and ``widths`` channels per stage; the arcface_torch networks
    use ``IRESNET_WIDTHS``, 112 px and 512-d. Each stage halves the resolution, so ``input_size``
    must be divisible by 16.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        *,
        widths: tuple[int, int, int, int] = IRESNET_WIDTHS,
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if input_size % 16:
            raise ValueError(f"IResNet input_size must be divisible by 16 (four stride-2 stages), got {input_size}")
        self.layers = tuple(layers)
        self.widths = tuple(widths)
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        in_channels = widths[0]
        stages = []
        for blocks, channels in zip(layers, widths):
            stage = [IBasicBlock(in_channels, channels, stride=2)]
            stage += [IBasicBlock(channels, channels) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        cells = (input_size // 16) ** 2
        self.fc = nn.Linear(widths[-1] * cells, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


def iresnet(depth: int, **kwargs) -> IResNet:
    """The arcface_torch IResNet of ``depth`` in {18, 34, 50, 100, 200}; ``kwargs`` go to :class:`IResNet`."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"IResNet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
    return IResNet(IRESNET_LAYERS[depth], **kwargs)
