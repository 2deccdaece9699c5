"""The IR backbones of AdaFace (Kim et al., CVPR 2022) in the layout of its released checkpoints.

Definition: ``input_layer`` = conv3x3(3->64)-BN-PReLU; ``body`` = a flat sequence of IR units
whose ``res_layer`` is BN-conv3x3-BN-PReLU-conv3x3(stride)-BN and whose ``shortcut_layer`` is a
1x1 max-pool with the unit's stride when the channel count is kept, else conv1x1(stride)-BN;
the first unit of each of the four stages has stride 2. ``output_layer`` = BN-Dropout-Flatten-
Linear(512*7*7 -> 512)-BatchNorm1d(affine=False). Keys: ``input_layer.{0,1,2}``,
``body.N.res_layer.{0..5}``, ``body.N.shortcut_layer.{0,1}``, ``output_layer.{0,3,4}``.
The released networks take BGR crops of 112x112 normalized as (x - 0.5) / 0.5.
"""

from __future__ import annotations

from torch import Tensor, nn

#: Units per stage, by the name AdaFace gives the network (IR-101 is its 100-layer variant).
ADAFACE_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    101: (3, 13, 30, 3),
}
ADAFACE_WIDTHS = (64, 128, 256, 512)


class BasicBlockIR(nn.Module):
    """IR unit: ``res_layer(x) + shortcut_layer(x)``."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        if in_channels == channels:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIR(nn.Module):
    """AdaFace IR backbone on (B, 3, 112, 112) normalized BGR crops, returning the (B, 512) embedding
    before its L2 normalization (AdaFace's network returns it divided by its norm, and the norm)."""

    def __init__(self, layers: tuple[int, int, int, int], *, embedding_size: int = 512, dropout: float = 0.4) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.embedding_size = embedding_size
        self.input_size = 112
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, ADAFACE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ADAFACE_WIDTHS[0]),
            nn.PReLU(ADAFACE_WIDTHS[0]),
        )
        units = []
        in_channels = ADAFACE_WIDTHS[0]
        for count, channels in zip(layers, ADAFACE_WIDTHS):
            units.append(BasicBlockIR(in_channels, channels, stride=2))
            units += [BasicBlockIR(channels, channels, stride=1) for _ in range(count - 1)]
            in_channels = channels
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(ADAFACE_WIDTHS[-1]),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(ADAFACE_WIDTHS[-1] * 7 * 7, embedding_size),
            nn.BatchNorm1d(embedding_size, affine=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def adaface_ir(depth: int, **kwargs) -> AdaFaceIR:
    """AdaFace IR-``depth`` for ``depth`` in {18, 34, 50, 101}; ``kwargs`` go to :class:`AdaFaceIR`."""
    if depth not in ADAFACE_LAYERS:
        raise ValueError(f"AdaFace IR depth must be one of {sorted(ADAFACE_LAYERS)}, got {depth}")
    return AdaFaceIR(ADAFACE_LAYERS[depth], **kwargs)
