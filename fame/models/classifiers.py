"""Classifiers by name (torchvision's, EfficientNet-Lite), wrapped to take [0, 1] RGB images and normalize inside."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_model, get_model_weights, list_models
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .checkpoints import load_checkpoint, load_state_dict_strictly, state_dict_in, strip_prefix
from .efficientnet_lite import EFFICIENTNET_LITE, efficientnet_lite_net
from .submodules import find_submodule, module_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """A weights' evaluation transform without its normalization.

    Resize the shorter side to ``resize_size`` (keeping the aspect ratio, so one scale for both
    axes), then centre-crop ``crop_size`` x ``crop_size``; exactly torchvision's
    ``ImageClassification`` preset minus the mean/std step, which :class:`Classifier` does itself.
    """

    resize_size: int
    crop_size: int
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def __call__(self, image: Tensor) -> Tensor:
        """Resize and crop a (C, H, W) or (B, C, H, W) image tensor (or a PIL image)."""
        image = TF.resize(image, [self.resize_size], interpolation=self.interpolation, antialias=True)
        return TF.center_crop(image, [self.crop_size])


class Classifier(nn.Module):
    """A classification network that takes RGB images in [0, 1] and normalizes them inside.

    ``forward(images) == net(normalize(images))``; explainers that perturb the normalized tensor
    (as the FAME paper does for ImageNet) call ``normalize`` once and then ``net`` directly.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        preprocess: Preprocessing = Preprocessing(256, 224),
        categories: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.preprocess = preprocess
        self.categories = categories
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """Map [0, 1] RGB images (B, C, H, W) to the network's input space."""
        if images.dim() != 4 or images.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"{self.name} expects images of shape (B, {self.mean.shape[1]}, H, W) in [0, 1], "
                f"got {tuple(images.shape)}"
            )
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.normalize(images))


def classifier_names() -> list[str]:
    """Every classification model name ``build_classifier`` accepts: torchvision's and EfficientNet-Lite 0-2."""
    return list_models(module=torchvision.models) + list(EFFICIENTNET_LITE)


def _weights_entry(weights_enum: type[WeightsEnum], choice: str) -> WeightsEnum | None:
    """The enum member a string names ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"), if any."""
    member = choice.removeprefix(weights_enum.__name__ + ".")
    return weights_enum[member] if member in weights_enum.__members__ else None


def _cached_weights_file(weights: WeightsEnum) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` looks for (and downloads) ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _preprocessing_of(weights: WeightsEnum) -> Preprocessing:
    transform = weights.transforms()
    return Preprocessing(int(transform.resize_size[0]), int(transform.crop_size[0]), transform.interpolation)


def build_classifier(
    name: str,
    weights: str | os.PathLike | None = "DEFAULT",
    num_classes: int | None = None,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    trust: bool = False,
    target_layer: str | None = None,
) -> Classifier:
    """Build classifier ``name`` as a :class:`Classifier` taking [0, 1] RGB images, in eval mode.

    EfficientNet-Lite 0-2 (``efficientnet_lite0`` ...) load the weights of their package from the
    package index (:mod:`fame.models.efficientnet_lite`); every other name is torchvision's.

    ``weights`` is a torchvision weights name ("DEFAULT", "IMAGENET1K_V1", ...), ``None`` for random
    initialisation, or the path of a state_dict file for this architecture (loaded strictly; a
    ``module.`` prefix is dropped; the ``{"model": state_dict, ...}`` files of torchvision's
    reference training scripts are accepted too). With torchvision weights the normalization and
    resize/crop are the weights' own; otherwise ImageNet mean/std (or ``mean``/``std``) and the
    resize/crop of the architecture's default weights. ``num_classes`` defaults to the weights'
    categories (1000). ``trust`` is passed to :func:`~fame.models.checkpoints.load_checkpoint`.
    Without network access torchvision weights are read from ``torch.hub.get_dir()/checkpoints``.
    ``target_layer`` names the Grad-CAM / feature-map layer (with or without the ``net.`` prefix)
    that :func:`~fame.models.target_layer` returns instead of the family's default.
    """
    classifier = _build_classifier(name, weights, num_classes, mean=mean, std=std, trust=trust)
    if target_layer is not None:
        classifier.net.target_layer_name = module_name(classifier.net, find_submodule(classifier.net, target_layer))
    return classifier


def _build_classifier(
    name: str,
    weights: str | os.PathLike | None,
    num_classes: int | None,
    *,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    trust: bool,
) -> Classifier:
    if name.lower() not in classifier_names():
        close = difflib.get_close_matches(name.lower(), classifier_names(), n=3)
        suggestion = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown classifier {name!r}.{suggestion} See fame.models.classifier_names().")
    name = name.lower()
    if name in EFFICIENTNET_LITE:
        return _efficientnet_lite(name, weights, num_classes, mean=mean, std=std, trust=trust)
    weights_enum = get_model_weights(name)
    default = weights_enum.DEFAULT
    entry = _weights_entry(weights_enum, str(weights)) if isinstance(weights, str) else None

    if entry is not None:
        categories = tuple(entry.meta["categories"])
        if num_classes is not None and num_classes != len(categories):
            raise ValueError(
                f"{name} weights {entry} have {len(categories)} classes but num_classes={num_classes}; "
                "use weights=None (or the path of a state_dict trained with that many classes)."
            )
        try:
            net = get_model(name, weights=entry)
        except OSError as error:
            cached = _cached_weights_file(entry)
            raise FileNotFoundError(
                f"Could not download the {name} weights {entry} ({error}). Put the file {cached.name} "
                f"(from {entry.url}) into the folder {cached.parent} (torch.hub.get_dir()/checkpoints; "
                "set TORCH_HOME to move it) and run again."
            ) from error
        transform = entry.transforms()
        return Classifier(
            net,
            name=name,
            mean=tuple(mean or transform.mean),
            std=tuple(std or transform.std),
            preprocess=_preprocessing_of(entry),
            categories=categories,
        ).eval()

    net = get_model(name, weights=None, num_classes=num_classes or len(default.meta["categories"]))
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"{name} weights {str(weights)!r} are neither a file nor a torchvision weights name "
                f"(choose from {', '.join(weights_enum.__members__)} or DEFAULT)."
            )
        state_dict = state_dict_in(
            load_checkpoint(path, trust=trust), source=str(path), wrappers=("model", "state_dict")
        )
        load_state_dict_strictly(
            net,
            strip_prefix(state_dict, "module."),
            source=str(path),
            expected=f"torchvision {name} with {num_classes or len(default.meta['categories'])} classes",
            hint="Pass num_classes= for a head of another size.",
        )
    return Classifier(
        net,
        name=name,
        mean=tuple(mean or IMAGENET_MEAN),
        std=tuple(std or IMAGENET_STD),
        preprocess=_preprocessing_of(default),
    ).eval()


def _efficientnet_lite(
    name: str,
    weights: str | os.PathLike | None,
    num_classes: int | None,
    *,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    trust: bool,
) -> Classifier:
    """EfficientNet-Lite with the reference package's preprocessing: a square resize to its image
    size and ImageNet mean/std (``efficientnet-lite-pytorch``'s usage example)."""
    categories = tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if weights == "DEFAULT" and num_classes not in (None, len(categories)):
        raise ValueError(
            f"{name} ImageNet weights have {len(categories)} classes but num_classes={num_classes}; "
            "use weights=None (or the path of a state_dict trained with that many classes)."
        )
    classes = num_classes or len(categories)
    size = EFFICIENTNET_LITE[name].image_size
    return Classifier(
        efficientnet_lite_net(name, weights, classes, trust=trust),
        name=name,
        mean=tuple(mean or IMAGENET_MEAN),
        std=tuple(std or IMAGENET_STD),
        preprocess=Preprocessing(size, size),
        categories=categories if classes == len(categories) else None,
    ).eval()


def replace_head(classifier: Classifier, num_classes: int, seed: int = 0) -> Classifier:
    """Swap the last ``nn.Linear`` of ``classifier.net`` for a freshly initialised one with
    ``num_classes`` outputs (fine-tuning a pretrained network on another label set)."""
    named = [(name, module) for name, module in classifier.net.named_modules() if isinstance(module, nn.Linear)]
    if not named:
        raise ValueError(f"{classifier.name} has no nn.Linear head to replace")
    name, old = named[-1]
    parent = classifier.net.get_submodule(name.rpartition(".")[0]) if "." in name else classifier.net
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    new = nn.Linear(old.in_features, int(num_classes), bias=old.bias is not None)
    torch.random.set_rng_state(generator_state)
    setattr(parent, name.rpartition(".")[2], new)
    classifier.categories = None
    return classifier


def finetune_classifier(
    name: str, num_classes: int, weights: str | os.PathLike | None = "DEFAULT", seed: int = 0, **options
) -> Classifier:
    """Classifier ``name`` with pretrained ``weights`` and a new ``num_classes``-way head (see replace_head)."""
    return replace_head(build_classifier(name, weights, **options), num_classes, seed=seed)
