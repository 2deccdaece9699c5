"""Writing a trained face backbone in the formats :func:`~fame.models.build_face_model` reads back.

- A state_dict in the arcface_torch layout (bare keys of the wrapped network, CPU tensors):
  ``build_face_model(arch, path, **network_arguments)`` loads it strictly.
- ONNX in the insightface model-zoo convention: one NCHW image input with a dynamic batch axis,
  one embedding output. Without baked normalization the graph takes ``(x - 127.5) / 127.5`` RGB
  (insightface's default for such graphs); with it, the graph takes raw 0..255 RGB pixels and
  opens with the ``Sub`` and ``Mul`` nodes by which insightface (and ``build_face_model("onnx",
  path)``) recognise a baked normalization.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .face import FaceEmbedder

#: The ONNX opset of exported graphs (what onnx2torch and current onnxruntime both support).
ONNX_OPSET = 17


def export_state_dict(embedder: FaceEmbedder, path: str | os.PathLike) -> Path:
    """Save the embedder's network weights as a bare state_dict (CPU tensors) at ``path``.

    Load it with ``build_face_model(embedder.arch, path, **network_arguments)`` where the network
    arguments are those the embedder was built with (e.g. ``embedding_size``, ``input_size``).
    """
    if not isinstance(embedder, FaceEmbedder):
        raise TypeError(f"expected a fame.models.FaceEmbedder, got {type(embedder).__name__}")
    if embedder.arch == "onnx":
        raise ValueError(
            "an embedder converted from ONNX has no build_face_model layout to save; export it with export_onnx"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().cpu().clone() for key, value in embedder.net.state_dict().items()}
    torch.save(state_dict, path)
    return path


def _uses_insightface_input(embedder: FaceEmbedder) -> bool:
    """Whether the embedder feeds its network RGB (x - 0.5) / 0.5, insightface's unbaked convention."""
    return (
        embedder.channel_order == "RGB"
        and torch.allclose(embedder.mean, torch.full_like(embedder.mean, 0.5))
        and torch.allclose(embedder.std, torch.full_like(embedder.std, 0.5))
    )


class _PixelInput(nn.Module):
    """The embedder on raw 0..255 RGB pixels, normalized as ``(x - 255 mean) * 1 / (255 std)``."""

    def __init__(self, embedder: FaceEmbedder) -> None:
        super().__init__()
        self.net = embedder.net
        self.bgr = embedder.channel_order == "BGR"
        mean, std = (embedder.mean.flip(1), embedder.std.flip(1)) if self.bgr else (embedder.mean, embedder.std)
        self.register_buffer("offset", mean * 255.0)  # in RGB order: the flip comes after
        self.register_buffer("factor", 1.0 / (std * 255.0))
        self.register_buffer("reversed_channels", torch.tensor([2, 1, 0]))  # a Gather: onnx2torch's Slice warns

    def forward(self, pixels: Tensor) -> Tensor:
        normalized = (pixels - self.offset) * self.factor
        if self.bgr:
            normalized = normalized.index_select(1, self.reversed_channels)
        return self.net(normalized)


def export_onnx(
    embedder: FaceEmbedder,
    path: str | os.PathLike,
    image_size: Optional[int | tuple[int, int]] = None,
    *,
    baked_normalization: Optional[bool] = None,
) -> Path:
    """Export the embedder to ONNX at ``path`` (opset :data:`ONNX_OPSET`, dynamic batch axis).

    ``image_size`` defaults to the embedder's input size. ``baked_normalization`` None bakes the
    normalization into the graph only where the embedder's input is not insightface's unbaked
    convention (RGB, 0.5/0.5), so ``build_face_model("onnx", path)`` always reproduces the
    embedder on [0, 1] RGB input. The embedder itself is left untouched (a CPU copy is traced).
    """
    if not isinstance(embedder, FaceEmbedder):
        raise TypeError(f"expected a fame.models.FaceEmbedder, got {type(embedder).__name__}")
    height, width = (
        embedder.input_size
        if image_size is None
        else ((image_size, image_size) if isinstance(image_size, int) else tuple(image_size))
    )
    if (height, width) != embedder.input_size:
        raise ValueError(
            f"{embedder.arch} takes {embedder.input_size[0]}x{embedder.input_size[1]} crops, "
            f"cannot export it for {height}x{width}"
        )
    bake = not _uses_insightface_input(embedder) if baked_normalization is None else baked_normalization
    traced = copy.deepcopy(embedder).float().cpu().eval()
    graph: nn.Module = _PixelInput(traced) if bake else traced.net
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes
        torch.onnx.export(
            graph,
            (torch.rand(1, 3, height, width),),
            str(path),
            dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript
            opset_version=ONNX_OPSET,
            input_names=["input.1"],
            output_names=["embedding"],
            dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
        )
    return path
