"""The layer that Grad-CAM-style baselines and FAME's feature-map loss look at, per architecture family.

The choice is the last layer whose output still has spatial meaning, (B, C, H, W): the FAME
paper's comparison uses ResNet ``layer4[-1]``, VGG ``features[-2]``, ConvNeXt ``features[-1][-1]`` and
IResNet the last block of the body.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models as tv

from .adaface import AdaFaceIR
from .classifiers import Classifier
from .face import FaceEmbedder
from .iresnet import IResNet

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


def target_layer(model: nn.Module) -> nn.Module:
    """The target layer of ``model``: a :class:`Classifier`, a :class:`FaceEmbedder` or the bare network.

    A network that names its own layer in a ``target_layer`` attribute (e.g. ``SmallCNN``) is taken at its word.
    """
    net = model.net if isinstance(model, (Classifier, FaceEmbedder)) else model
    own = getattr(net, "target_layer", None)
    if isinstance(own, nn.Module):
        return own
    for family, layer_of in _LAYER_OF:
        if isinstance(net, family):
            return layer_of(net)
    known = ", ".join(family.__name__ for family, _ in _LAYER_OF)
    raise ValueError(
        f"No target layer is known for {type(net).__name__} (known families: {known}). Transformers "
        "(ViT, Swin, MaxViT) have no (B, C, H, W) layer without a reshape; for other networks pass the layer "
        "yourself or give the network a target_layer attribute."
    )
