"""Face-recognition models behind one interface: [0, 1] RGB crops in, embeddings out.

Every checkpoint format has its own channel order and normalization (README, "Bring your own data and checkpoints");
:class:`FaceEmbedder` records both and applies them, so no caller handles either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .adaface import ADAFACE_LAYERS, adaface_ir
from .checkpoints import load_checkpoint, load_state_dict_strictly, state_dict_in, strip_prefix
from .iresnet import IRESNET_LAYERS, IResNet, iresnet
from .onnx import load_onnx_backbone

#: The narrow IResNet used on CPU and with the synthetic data: one block per stage.
SMALL_LAYERS = (1, 1, 1, 1)
SMALL_WIDTHS = (16, 32, 64, 128)


def _per_channel(value: float | Sequence[float]) -> Tensor:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"expected one value or three (one per channel), got {value!r}")
    return torch.tensor(values).view(1, 3, 1, 1)


class FaceEmbedder(nn.Module):
    """A face network that takes aligned RGB crops in [0, 1], shape (B, 3, H, W), and returns (B, D).

    The network's input is ``(images[:, order] - mean) / std`` with ``order`` the channel order it
    was trained on (``"RGB"`` or ``"BGR"``) and ``mean``/``std`` per channel in [0, 1] units (e.g.
    0.5/0.5 for arcface_torch's (x - 127.5) / 127.5, or 0/(1/255) for a network fed raw 0..255
    pixels). The embedding is not L2-normalized.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        input_size: tuple[int, int],
        embedding_size: int,
        channel_order: str = "RGB",
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
    ) -> None:
        super().__init__()
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        self.net = net
        self.arch = arch
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.embedding_size = int(embedding_size)
        self.channel_order = channel_order
        self.register_buffer("mean", _per_channel(mean), persistent=False)
        self.register_buffer("std", _per_channel(std), persistent=False)

    def network_input(self, images: Tensor) -> Tensor:
        """The tensor the wrapped network sees for [0, 1] RGB ``images``."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.input_size:
            height, width = self.input_size
            raise ValueError(
                f"{self.arch} expects aligned RGB face crops of shape (B, 3, {height}, {width}) in [0, 1], "
                f"got {tuple(images.shape)}; align or resize the faces to {height}x{width} first."
            )
        if self.channel_order == "BGR":
            images = images.flip(1)
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.network_input(images))

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, input_size={self.input_size}, embedding_size={self.embedding_size}, "
            f"channel_order={self.channel_order!r}"
        )


def face_arch_names() -> list[str]:
    """Every ``arch`` that :func:`build_face_model` accepts."""
    return (
        [f"iresnet{depth}" for depth in IRESNET_LAYERS]
        + [f"adaface_ir{depth}" for depth in ADAFACE_LAYERS]
        + ["onnx", "small"]
    )


def _blocks_per_stage(keys: Iterable[str], pattern: str) -> list[int]:
    counts: dict[int, set[int]] = {}
    for key in keys:
        match = re.match(pattern, key)
        if match:
            counts.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return [len(counts[stage]) for stage in sorted(counts)]


def guess_face_arch(keys: Iterable[str]) -> str | None:
    """Which ``build_face_model`` arch a state_dict's key names look like, if any."""
    keys = [key.removeprefix("module.").removeprefix("model.") for key in keys]
    if any(key.startswith("body.") and ".res_layer." in key for key in keys):
        units = len({key.split(".")[1] for key in keys if key.startswith("body.")})
        depth = next((depth for depth, layers in ADAFACE_LAYERS.items() if sum(layers) == units), None)
        return f"adaface_ir{depth}" if depth else f"an AdaFace IR network with {units} units"
    blocks = tuple(_blocks_per_stage(keys, r"layer(\d)\.(\d+)\.bn1\.weight$"))
    if len(blocks) == 4:
        depth = next((depth for depth, layers in IRESNET_LAYERS.items() if layers == blocks), None)
        if depth:
            return f"iresnet{depth}"
        return "small" if blocks == SMALL_LAYERS else f"an IResNet with {list(blocks)} blocks per stage"
    return None


def _load_into(net: nn.Module, state_dict: dict[str, Tensor], *, source: str, arch: str) -> None:
    guess = guess_face_arch(state_dict)
    if guess is None:
        hint = f"The keys fit none of the known layouts ({', '.join(face_arch_names())})."
    elif guess == arch:
        hint = (
            f"The file looks like {arch} but differs in what is listed: is it damaged, or trained with other "
            "constructor arguments (embedding_size, input_size, widths)?"
        )
    elif guess in face_arch_names():
        hint = f"The keys look like {guess}; pass arch='{guess}' if that is what the file holds."
    else:
        hint = f"The keys look like {guess}."
    load_state_dict_strictly(net, state_dict, source=source, expected=arch, hint=hint)


def _adaface_backbone(content: object, source: str) -> dict[str, Tensor]:
    """The backbone of an AdaFace Lightning ``.ckpt``: ``state_dict`` keys under ``model.``, ``head.`` dropped."""
    state_dict = state_dict_in(content, source=source, wrappers=("state_dict",))
    if not any(key.startswith("model.") for key in state_dict):
        return strip_prefix(state_dict, "module.")
    return {key.removeprefix("model."): value for key, value in state_dict.items() if not key.startswith("head.")}


def build_face_model(
    arch: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    trust: bool = False,
    channel_order: str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    baked_normalization: bool | None = None,
    **net_kwargs,
) -> FaceEmbedder:
    """Build face network ``arch`` (see :func:`face_arch_names`), load ``checkpoint`` strictly, return it in eval mode.

    - ``iresnet18`` .. ``iresnet200``: arcface_torch ``backbone.pth``/``model.pt`` (a bare
      state_dict, ``module.`` prefixes dropped); RGB, 0.5/0.5, 112x112.
    - ``adaface_ir18/34/50/101``: AdaFace Lightning ``.ckpt`` (backbone under ``model.``, ``head.``
      ignored) or a bare backbone state_dict; BGR, 0.5/0.5, 112x112.
    - ``onnx``: an insightface model-zoo ``.onnx`` converted with onnx2torch; RGB by default;
      ``baked_normalization`` None detects it as insightface does (then raw 0..255 input), False
      means (x - 0.5) / 0.5 outside the graph; ``input_size`` only where the graph leaves it open.
    - ``small``: a narrow IResNet (one block per stage, widths 16-128, 64 px, 128-d) for CPU runs.

    ``channel_order``, ``mean`` and ``std`` override the format's defaults; ``net_kwargs`` go to
    the network constructor (e.g. ``embedding_size``, ``input_size`` for ``small``); ``trust`` is
    passed to :func:`~fame.models.checkpoints.load_checkpoint`.
    """
    source = str(checkpoint)
    if arch == "onnx":
        if checkpoint is None:
            raise ValueError("arch='onnx' needs checkpoint= the path of the .onnx file")
        backbone = load_onnx_backbone(checkpoint)
        input_size = net_kwargs.pop("input_size", None) or backbone.input_size
        if net_kwargs:
            raise TypeError(f"arch='onnx' takes no network arguments but input_size, got {sorted(net_kwargs)}")
        if input_size is None:
            raise ValueError(f"{source}: the graph's input height and width are not fixed; pass input_size=(H, W)")
        input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        baked = backbone.baked_normalization if baked_normalization is None else baked_normalization
        with torch.no_grad():
            embedding_size = backbone.net(torch.zeros(1, 3, *input_size)).shape[-1]
        embedder = FaceEmbedder(
            backbone.net,
            arch=arch,
            input_size=input_size,
            embedding_size=embedding_size,
            channel_order=channel_order or "RGB",
            mean=(0.0 if baked else 0.5) if mean is None else mean,
            std=(1 / 255 if baked else 0.5) if std is None else std,
        )
        return embedder.eval()

    adaface = re.fullmatch(r"adaface_ir(\d+)", arch)
    resnet = re.fullmatch(r"iresnet(\d+)", arch)
    if adaface and int(adaface.group(1)) in ADAFACE_LAYERS:
        net: nn.Module = adaface_ir(int(adaface.group(1)), **net_kwargs)
        default_order = "BGR"
    elif resnet and int(resnet.group(1)) in IRESNET_LAYERS:
        net = iresnet(int(resnet.group(1)), **net_kwargs)
        default_order = "RGB"
    elif arch == "small":
        net = IResNet(SMALL_LAYERS, **{"widths": SMALL_WIDTHS, "embedding_size": 128, "input_size": 64, **net_kwargs})
        default_order = "RGB"
    else:
        raise ValueError(f"Unknown face arch {arch!r}; choose one of {', '.join(face_arch_names())}")

    if checkpoint is not None:
        content = load_checkpoint(checkpoint, trust=trust)
        if adaface:
            state_dict = _adaface_backbone(content, source)
        else:
            state_dict = strip_prefix(state_dict_in(content, source=source), "module.")
        _load_into(net, state_dict, source=source, arch=arch)

    embedder = FaceEmbedder(
        net,
        arch=arch,
        input_size=(net.input_size, net.input_size),
        embedding_size=net.embedding_size,
        channel_order=channel_order or default_order,
        mean=0.5 if mean is None else mean,
        std=0.5 if std is None else std,
    )
    return embedder.eval()
