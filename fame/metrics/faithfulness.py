"""Faithfulness of attribution maps by pixel removal: deletion / insertion curves (DESIGN.md sec. 3).

Deletion and insertion follow the RISE protocol (Petsiuk et al., BMVC 2018): pixels are removed
from (deletion) or inserted into (insertion) the image in the order of the map, and the target
class probability is recorded at each fraction of pixels. Deletion replaces removed pixels with
zero; insertion starts from a blurred copy of the image (RISE: Gaussian kernel 11, sigma 5).

Pixel order is a stable ranking of the map: most relevant first sorts descending, least relevant
first ascending, and tied values keep raster order in both. At a fraction f of N pixels the
``round(f * N)`` (halves rounded up) first-ranked pixels are affected.

``verification_curve`` applies the same removal to face verification (the FAME paper's Tab. 2).

Every function is batched and runs on the device of its inputs. Pass a model in eval mode: with
batch-dependent layers (BatchNorm in training mode) no metric can be independent of batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))
"""0, 0.1, ..., 1: the eleven removal levels of the paper and of the ROAD protocol."""

RISE_BLUR_KERNEL = 11
RISE_BLUR_SIGMA = 5.0


def _check_maps(images: Tensor, maps: Tensor) -> Tensor:
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if maps.dim() != 4 or maps.shape[1] != 1 or maps.shape[0] != images.shape[0] or maps.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"maps must have shape (B, 1, H, W) matching images {tuple(images.shape)}, got {tuple(maps.shape)}; "
            "resize the maps to the image size first"
        )
    return maps


def _check_targets(targets: Tensor, num_samples: int, name: str = "targets") -> Tensor:
    """Class indices (B,) as a long tensor; any other shape is refused with the expected one."""
    targets = torch.as_tensor(targets)
    if targets.dim() != 1 or targets.shape[0] != num_samples:
        raise ValueError(f"{name} must hold one class index per image, shape ({num_samples},), got {tuple(targets.shape)}")
    if targets.is_floating_point() and not torch.equal(targets, targets.round()):
        raise ValueError(f"{name} must be integer class indices, got {targets.tolist()[:8]}")
    return targets.long()


def _check_levels(levels: Tensor, name: str) -> Tensor:
    """Removal levels (P,) that strictly increase (curves and their areas are read in this order)."""
    if levels.numel() == 0:
        raise ValueError(f"{name} is empty: pass at least one level")
    if levels.numel() > 1 and not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError(f"{name} must strictly increase, got {levels.tolist()}")
    return levels


def pixel_ranks(maps: Tensor, most_relevant_first: bool = True) -> Tensor:
    """Removal rank of each pixel (B, 1, H, W), 0 = removed first; stable, ties in raster order."""
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    flat = maps.flatten(1).float()
    order = torch.sort(flat, dim=1, descending=most_relevant_first, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks.view_as(maps)


def pixel_counts(fractions: Union[float, Sequence[float], Tensor], num_pixels: int, device=None) -> Tensor:
    """Number of pixels ``round(f * N)`` (halves up) for each fraction f in [0, 1]."""
    fractions = torch.as_tensor(fractions, dtype=torch.float64, device=device)
    if ((fractions < 0) | (fractions > 1)).any():
        raise ValueError(f"fractions must lie in [0, 1], got {fractions.tolist()}")
    return torch.floor(fractions * num_pixels + 0.5 + 1e-9).long()


def top_pixel_mask(maps: Tensor, fraction: Union[float, Tensor], most_relevant_first: bool = True) -> Tensor:
    """Boolean mask (B, 1, H, W) of the first ``fraction`` of pixels in map order.

    ``fraction`` is a float or a tensor (B,) of per-sample fractions.
    """
    ranks = pixel_ranks(maps, most_relevant_first)
    counts = pixel_counts(fraction, ranks[0].numel(), ranks.device)
    return ranks < counts.reshape(-1, 1, 1, 1)


def remove_top_pixels(
    images: Tensor,
    maps: Tensor,
    fraction: Union[float, Tensor],
    fill: Union[float, Tensor] = 0.0,
    most_relevant_first: bool = True,
) -> Tensor:
    """Images (B, C, H, W) with the first ``fraction`` of pixels of each map (B, 1, H, W) set to ``fill``.

    ``fraction`` is a float or a tensor (B,); ``fill`` a scalar or a tensor shaped like ``images``
    (e.g. a blurred copy). Ranking is stable: tied map values are taken in raster order.
    """
    maps = _check_maps(images, maps)
    removed = top_pixel_mask(maps, fraction, most_relevant_first)
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    return torch.where(removed, fill, images)


def rise_blur(images: Tensor) -> Tensor:
    """The RISE insertion baseline: Gaussian blur, kernel 11, sigma 5 (reflect padding)."""
    return gaussian_blur(images, [RISE_BLUR_KERNEL, RISE_BLUR_KERNEL], [RISE_BLUR_SIGMA, RISE_BLUR_SIGMA])


def evaluate_levels(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    num_levels: int,
    make_inputs: Callable[[Tensor, Tensor], Tensor],
    batch_size: Optional[int] = None,
) -> Tensor:
    """Model outputs (num_levels, B, ...) of ``make_inputs(levels, samples)`` in chunks of ``batch_size``.

    The (level, sample) pairs are visited level-major; ``make_inputs`` receives index tensors of a
    chunk and returns its perturbed images. ``batch_size`` (default B) bounds the forward pass.
    """
    num_samples = images.shape[0]
    chunk = num_samples if batch_size is None else int(batch_size)
    if chunk < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    flat = torch.arange(num_levels * num_samples, device=images.device)
    outputs = []
    with torch.no_grad():
        for start in range(0, flat.numel(), chunk):
            index = flat[start : start + chunk]
            outputs.append(model(make_inputs(index // num_samples, index % num_samples)))
    result = torch.cat(outputs)
    return result.view(num_levels, num_samples, *result.shape[1:])


def deletion_curve(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    fractions: Union[Sequence[float], Tensor] = DEFAULT_FRACTIONS,
    mode: str = "deletion",
    baseline: Optional[str] = None,
    batch_size: Optional[int] = None,
) -> Tensor:
    """Softmax probability of the target class (B, len(fractions)) along a RISE curve.

    ``mode="deletion"``: the top f of pixels (map order, most relevant first) replaced by the
    baseline; ``mode="insertion"``: the baseline image with the top f of pixels restored.
    ``baseline`` is "zero" or "blur" (RISE Gaussian blur); by default deletion uses "zero" and
    insertion "blur" as in RISE. ``batch_size`` bounds the images per forward pass (default B).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    baseline = baseline or ("zero" if mode == "deletion" else "blur")
    if baseline == "zero":
        reference = torch.zeros_like(images)
    elif baseline == "blur":
        reference = rise_blur(images)
    else:
        raise ValueError(f"baseline must be 'zero' or 'blur', got {baseline!r}")
    maps = _check_maps(images, maps)
    targets = _check_targets(targets, images.shape[0])
    ranks = pixel_ranks(maps, most_relevant_first=True)
    counts = pixel_counts(fractions, ranks[0].numel(), images.device)
    if counts.numel() == 0:
        raise ValueError("fractions is empty: pass at least one fraction in [0, 1]")
    start, end = (images, reference) if mode == "deletion" else (reference, images)

    def make_inputs(levels: Tensor, samples: Tensor) -> Tensor:
        affected = ranks[samples] < counts[levels].view(-1, 1, 1, 1)
        return torch.where(affected, end[samples], start[samples])

    logits = evaluate_levels(model, images, counts.numel(), make_inputs, batch_size)
    probabilities = logits.float().softmax(dim=-1)
    index = targets.to(images.device).view(1, -1, 1).expand(counts.numel(), -1, 1)
    return probabilities.gather(2, index).squeeze(2).t()


def curve_auc(curve: Tensor, fractions: Union[Tensor, Sequence[float]]) -> Tensor:
    """Normalized trapezoid area (B,) under curves (B, P) sampled at ``fractions`` (P,).

    The area is divided by the span ``fractions[-1] - fractions[0]``, so a constant curve c has
    area c whatever the sampling (the paper's Tab. 2 reports this x100). ``fractions`` must
    strictly increase.
    """
    fractions = torch.as_tensor(fractions, dtype=torch.float64, device=curve.device)
    if curve.dim() == 1:
        curve = curve.unsqueeze(0)
    if curve.shape[-1] != fractions.numel() or fractions.numel() < 2:
        raise ValueError(
            f"curve (B, P) needs P = len(fractions) >= 2 points, got curve {tuple(curve.shape)} "
            f"and {fractions.numel()} fractions"
        )
    _check_levels(fractions, "fractions")
    span = fractions[-1] - fractions[0]
    area = torch.trapezoid(curve.double(), fractions, dim=-1) / span
    return area.to(curve.dtype if curve.is_floating_point() else torch.float32)


@dataclass
class VerificationCurve:
    """Face verification under probe deletion / insertion (the paper's Tab. 2)."""

    percentages: Tensor  # (P,) share of probe pixels removed (deletion) or kept (insertion), in %
    scores: Tensor  # (N, P) cosine similarity of gallery and perturbed probe
    correct: Tensor  # (N, P) 1.0 where (score >= threshold) matches the pair label
    accuracy: Tensor  # (P,) verification accuracy per percentage
    auc: float  # normalized trapezoid area under the accuracy curve, x100
    threshold: float  # the fixed decision threshold


def _cosine_embeddings(embedder: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    return F.normalize(embedder(images).float(), dim=1)


def verification_curve(
    embedder: Callable[[Tensor], Tensor],
    galleries: Tensor,
    probes: Tensor,
    same: Tensor,
    maps: Tensor,
    threshold: Optional[float] = None,
    percentages: Union[Sequence[float], Tensor] = tuple(range(0, 101, 10)),
    mode: str = "deletion",
    fill: Union[float, Tensor] = 0.0,
    batch_size: Optional[int] = None,
) -> VerificationCurve:
    """Verification accuracy at a fixed threshold as the top P % of the probe's e+ map is removed / kept.

    ``galleries`` and ``probes`` (N, 3, H, W) form N pairs, ``same`` (N,) marks genuine pairs and
    ``maps`` (N, 1, H, W) are the probes' e+ (similarity) maps. Only the probe is perturbed:
    ``mode="deletion"`` sets its top P % pixels (stable map order) to ``fill``, ``"insertion"``
    keeps only them (the rest set to ``fill``). A pair is accepted when the cosine similarity of
    the L2-normalised embeddings is >= ``threshold``; by default the threshold is the EER
    threshold of the clean scores (``fame.metrics.verification.eer_threshold``, candidates swept
    from high to low, ties to the largest). Lower deletion AUC and higher insertion AUC are better.
    """
    from .verification import eer_threshold

    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if galleries.shape != probes.shape:
        raise ValueError(f"galleries and probes must have the same shape, got {tuple(galleries.shape)} and {tuple(probes.shape)}")
    maps = _check_maps(probes, maps)
    same = torch.as_tensor(same).to(probes.device)
    if same.dim() != 1 or same.shape[0] != probes.shape[0]:
        raise ValueError(f"same must hold one genuine/impostor flag per pair, shape ({probes.shape[0]},), got {tuple(same.shape)}")
    same = same.bool()
    chunk = probes.shape[0] if batch_size is None else int(batch_size)
    with torch.no_grad():
        gallery_embeddings = torch.cat([_cosine_embeddings(embedder, part) for part in galleries.split(chunk)])
    if threshold is None:
        clean = torch.cat([_cosine_embeddings(embedder, part) for part in probes.split(chunk)])
        threshold, _ = eer_threshold((clean * gallery_embeddings).sum(dim=1), same)
    fractions = torch.as_tensor(percentages, dtype=torch.float64) / 100
    ranks = pixel_ranks(maps, most_relevant_first=True)
    counts = pixel_counts(fractions, ranks[0].numel(), probes.device)
    fill = torch.as_tensor(fill, dtype=probes.dtype, device=probes.device).expand_as(probes)

    def make_inputs(levels: Tensor, samples: Tensor) -> Tensor:
        top = ranks[samples] < counts[levels].view(-1, 1, 1, 1)
        keep = ~top if mode == "deletion" else top
        return torch.where(keep, probes[samples], fill[samples])

    embeddings = F.normalize(evaluate_levels(embedder, probes, counts.numel(), make_inputs, batch_size).float(), dim=2)
    scores = (embeddings * gallery_embeddings.unsqueeze(0)).sum(dim=2).t()  # (N, P)
    correct = ((scores.double() >= threshold) == same.view(-1, 1)).float()
    accuracy = correct.mean(dim=0)
    return VerificationCurve(
        percentages=torch.as_tensor(percentages, dtype=torch.float32),
        scores=scores,
        correct=correct,
        accuracy=accuracy,
        auc=float(curve_auc(accuracy.unsqueeze(0), fractions)[0]) * 100,
        threshold=float(threshold),
    )
