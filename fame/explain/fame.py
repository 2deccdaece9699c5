"""Public FAME entry points for classification, verification and feature maps."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .engine import (
    TASK_EPSILONS,
    FameConfig,
    FameStats,
    attribution_map,
    check_images,
    lots_perturbation,
    perturbation_maps,
    working_dtype,
)
from .guard import explaining
from .objectives import (
    VERIFICATION_MODES,
    ClassLogit,
    CosineToReference,
    FeatureActivation,
    check_locations,
    full_precision,
    grid_locations,
    resolve_layer,
)
from .precision import engine_arithmetic, forward_autocast, maybe_channels_last

#: The paper's setting for face verification: stop once the similarity loss is below 0.01.
VERIFICATION_EPSILON = TASK_EPSILONS["verification"]


def _check_targets(targets, batch: int, device) -> Tensor:
    targets = torch.as_tensor(targets).to(device)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.dim() == 0:
        targets = targets.expand(batch)
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(
            f"targets must hold one class index per image, shape ({batch},), got shape {tuple(targets.shape)}"
        )
    return targets.long().clone()


def explain_classification(
    model: nn.Module,
    images: Tensor,
    targets: Union[Tensor, Sequence[int], int],
    config: Optional[FameConfig] = None,
    loss: str = "logit",
    return_stats: bool = False,
):
    """FAME maps (B, 1, H, W) in [0, 1] for class ``targets`` of a classifier returning logits.

    ``loss`` is what the descent lowers for class o: "logit" z_o (the paper's), "abs_logit"
    |z_o|, "log_softmax" log p_o, "probability" p_o, or "margin" z_o - max_{j != o} z_j; with
    ``epsilon=0`` the margin stops each image once o is no longer its top class, so a correctly
    classified image always takes at least one step. The paper runs T = 500 steps with no early
    stop (``epsilon="task"`` means None here). The step is taken in the space ``images`` live
    in: hand the normalized tensor to perturb it, or [0, 1] pixels to a model that normalizes
    inside.
    """
    config = (config or FameConfig()).for_task("classification")
    check_images(images)
    with explaining(model, channels_last=config.channels_last):
        inputs = images.detach().clone()
        objective = ClassLogit(model, _check_targets(targets, inputs.shape[0], inputs.device), loss)
        return perturbation_maps(objective, inputs, config, return_stats)


def _broadcast_references(reference_images: Tensor, batch: int) -> Tensor:
    if isinstance(reference_images, Tensor) and reference_images.dim() == 3:
        reference_images = reference_images.unsqueeze(0)
    check_images(reference_images, "reference_images")
    if reference_images.shape[0] not in (1, batch):
        raise ValueError(
            f"reference_images must be one image or one per sample ({batch}), got shape {tuple(reference_images.shape)}"
        )
    return reference_images


def embed(model: nn.Module, images: Tensor, batch_size: int = 256, config: Optional[FameConfig] = None) -> Tensor:
    """Embeddings of ``images`` without gradients (B, D), in ``config``'s precision and memory
    format (the same forward pass the explained side runs), returned in x_t's dtype."""
    config = config or FameConfig()
    device = images.device
    chunks = []
    with torch.no_grad(), engine_arithmetic(config.precision, device):
        for start in range(0, images.shape[0], batch_size):
            chunk = maybe_channels_last(
                images[start : start + batch_size].to(working_dtype(images)), config.channels_last
            )
            with forward_autocast(config.precision, device):
                chunks.append(model(chunk))
    return full_precision(torch.cat(chunks))


def explain_verification(
    model: nn.Module,
    images: Tensor,
    reference_images: Tensor,
    config: Optional[FameConfig] = None,
    modes: Sequence[str] = VERIFICATION_MODES,
    return_stats: bool = False,
    threshold: Optional[Union[float, Tensor]] = None,
):
    """FAME maps for face pairs: which regions of ``images`` support ("similar", e+) or oppose
    ("dissimilar", e-) the match with ``reference_images``.

    ``reference_images`` is one image for the whole batch or one per sample; its embedding is
    computed once and frozen, so a map explains ``images`` only (swap the roles for the other
    side). The paper stops each sample once its loss is below 0.01: ``epsilon="task"``, the
    default of every FameConfig, means exactly that here, so a config that changes other fields
    keeps it; pass ``epsilon=None`` to run all T steps. ``threshold`` (one number or one per pair)
    is the verification threshold on s that ``stop="flip"`` watches. All modes run as one batch.
    Returns ``{mode: maps (B, 1, H, W)}`` (and ``{mode: FameStats}`` with ``return_stats=True``).
    """
    config = (config or FameConfig()).for_task("verification")
    check_images(images)
    modes = tuple(modes)
    unknown = [mode for mode in modes if mode not in VERIFICATION_MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct values among {VERIFICATION_MODES}, got {modes}")
    batch = images.shape[0]
    references = _broadcast_references(reference_images, batch)
    if references.shape[1] != images.shape[1]:
        raise ValueError(
            f"reference_images must have {images.shape[1]} channels like images, got shape {tuple(references.shape)}"
        )
    with explaining(model, channels_last=config.channels_last):
        inputs = images.detach().clone()
        reference_embeddings = embed(model, references.detach().clone().to(inputs.device), config=config)
        reference_embeddings = reference_embeddings.expand(batch, -1)
        stacked = inputs.repeat(len(modes), 1, 1, 1)
        dissimilar = torch.tensor([mode == "dissimilar" for mode in modes], device=inputs.device)
        dissimilar = dissimilar.repeat_interleave(batch)
        if isinstance(threshold, Tensor) and threshold.dim() == 1:
            threshold = threshold.to(inputs.device).repeat(len(modes))
        objective = CosineToReference(model, reference_embeddings.repeat(len(modes), 1), dissimilar, threshold)
        result = lots_perturbation(objective, stacked, config)
        maps = attribution_map(stacked.to(result.perturbed.dtype), result.perturbed, config)
    out = {mode: maps[k * batch : (k + 1) * batch] for k, mode in enumerate(modes)}
    if not return_stats:
        return out
    stats = {mode: result.stats[k * batch : (k + 1) * batch] for k, mode in enumerate(modes)}
    return out, stats


def feature_map_size(model: nn.Module, layer: Union[str, nn.Module], image: Tensor) -> Tuple[int, int]:
    """Spatial size (h, w) of ``layer``'s output for ``image`` (1, C, H, W)."""
    module = resolve_layer(model, layer)
    with explaining(model), torch.no_grad():
        locations = torch.zeros(1, 2, dtype=torch.long, device=image.device)
        with FeatureActivation(model, module, locations) as capture:
            features = capture.activations(image[:1].detach().clone())
    return int(features.shape[-2]), int(features.shape[-1])


def explain_feature_map(
    model: nn.Module,
    layer: Union[str, nn.Module],
    image: Tensor,
    locations: Optional[Union[Sequence[Tuple[int, int]], Tensor]] = None,
    config: Optional[FameConfig] = None,
    batch_size: Optional[int] = None,
    return_stats: bool = False,
):
    """FAME maps (L, 1, H, W) of one image for L locations (row, col) of ``layer``'s output.

    The loss at location k is sum_c |a_c[k]| (paper Sec. 4.1); ``locations`` defaults to every
    cell of the layer's output, row-major (49 for ResNet ``layer4`` at 224 px). The locations run
    as one batch, or in chunks of ``batch_size``. ``layer`` is a submodule or its dotted name.
    """
    config = (config or FameConfig()).for_task("feature_map")
    if isinstance(image, Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    check_images(image, "image")
    if image.shape[0] != 1:
        raise ValueError(f"image must be a single image (1, C, H, W) or (C, H, W), got shape {tuple(image.shape)}")
    module = resolve_layer(model, layer)
    height, width = feature_map_size(model, module, image)
    if locations is None:
        locations = grid_locations(height, width, image.device)
    locations = check_locations(locations, height, width, image.device)
    chunk = batch_size or locations.shape[0]
    maps, stats = [], []
    with explaining(model, channels_last=config.channels_last):
        source = image.detach().clone()
        for start in range(0, locations.shape[0], chunk):
            selected = locations[start : start + chunk]
            inputs = source.expand(selected.shape[0], -1, -1, -1).clone()
            with FeatureActivation(model, module, selected) as objective:
                result = lots_perturbation(objective, inputs, config)
            maps.append(attribution_map(inputs.to(result.perturbed.dtype), result.perturbed, config))
            stats.append(result.stats)
    maps = torch.cat(maps)
    if not return_stats:
        return maps
    return maps, FameStats.cat(stats)
