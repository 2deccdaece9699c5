"""The layer that Grad-CAM-style baselines and FAME's feature-map loss look at, per architecture family.

The choice is the last layer whose output still has spatial meaning, (B, C, H, W): the FAME
paper's comparison uses ResNet ``layer4[-1]``, VGG ``features[-2]``, ConvNeXt ``features[-1][-1]`` and
IResNet the last block of the body. timm's EfficientNet (``build_classifier("efficientnet_lite0")``) is
taken at its head, ``bn2``: the 1x1 head convolution's normalized, activated 7x7 map at 224 px.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn
from torchvision import models as tv

from .adaface import AdaFaceIR
from .classifiers import Classifier
from .face import FaceEmbedder
from .iresnet import IResNet
from .submodules import find_submodule, module_name

_LAYER_OF: list[tuple[type[nn.Module], Callable[[nn.Module], nn.Module]]] = [
    (tv.ResNet, lambda net: net.layer4[-1]),
    (tv.VGG, lambda net: net.features[-2]),
    (tv.AlexNet, lambda net: net.features[-2]),
    (tv.ConvNeXt, lambda net: net.features[-1][-1]),
    (tv.EfficientNet, lambda net: net.features[-1]),
    (tv.MobileNetV2, lambda net: net.features[-1]),
    (tv.MobileNetV3, lambda net: net.features[-1]),
    (tv.DenseNet, lambda net: net.features[-1]),
    (tv.RegNet, lambda net: net.trunk_output[-1]),
    (tv.ShuffleNetV2, lambda net: net.conv5),
    (tv.MNASNet, lambda net: net.layers[-1]),
    (tv.SqueezeNet, lambda net: net.features[-1]),
    (tv.GoogLeNet, lambda net: net.inception5b),
    (tv.Inception3, lambda net: net.Mixed_7c),
    (IResNet, lambda net: net.layer4[-1]),
    (AdaFaceIR, lambda net: net.body[-1]),
]


def _timm_layer_of() -> list[tuple[type[nn.Module], Callable[[nn.Module], nn.Module]]]:
    """timm's families; a timm network exists only once timm is imported, so it is not imported here."""
    if "timm" not in sys.modules:
        return []
    from timm.models.efficientnet import EfficientNet

    return [(EfficientNet, lambda net: net.bn2)]


def target_layer(model: nn.Module) -> nn.Module:
    """The target layer of ``model``: a :class:`Classifier`, a :class:`FaceEmbedder` or the bare network.

    A layer named in ``target_layer_name`` (``build_classifier(..., target_layer="blocks.5")``,
    :func:`name_target_layer`) comes first; a network that names its own layer in a ``target_layer``
    attribute (e.g. ``SmallCNN``) is taken at its word.
    """
    net = model.net if isinstance(model, (Classifier, FaceEmbedder)) else model
    chosen = getattr(net, "target_layer_name", None)
    if chosen is not None:
        return find_submodule(net, chosen)
    own = getattr(net, "target_layer", None)
    if isinstance(own, nn.Module):
        return own
    families = _LAYER_OF + _timm_layer_of()
    for family, layer_of in families:
        if isinstance(net, family):
            return layer_of(net)
    known = ", ".join(f"{family.__module__.partition('.')[0]} {family.__name__}" for family, _ in families)
    raise ValueError(
        f"No target layer is known for {type(net).__name__} of {type(net).__module__} (known families: {known}). "
        "Name the layer, a (B, C, H, W) feature map that the forward pass runs once, by its dotted name: "
        "explainer.<method>.layer=<name> (one method) in explain.py, model.target_layer=<name> (every method), "
        "or the layer argument in Python. Transformers (ViT, Swin, MaxViT) have no such layer without a reshape."
    )


def name_target_layer(model: nn.Module, name: str) -> nn.Module:
    """Make the submodule ``name`` (with or without the ``net.`` prefix) the target layer that
    :func:`target_layer` returns for ``model`` (``model.target_layer`` in the configs); returns ``model``.
    An unknown name is a ValueError listing the closest names."""
    net = model.net if isinstance(model, (Classifier, FaceEmbedder)) else model
    net.target_layer_name = module_name(net, find_submodule(net, name))
    return model
