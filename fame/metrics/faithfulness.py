"""Faithfulness of attribution maps by pixel removal: deletion / insertion curves
(docs/method.md#deletion-and-insertion, #verification-under-removal).

Deletion and insertion (Petsiuk et al., RISE, BMVC 2018): pixels are removed from (deletion) or
inserted into (insertion) the image in the order of the map, and the target class probability is
recorded at each level. Two protocols (``substrate`` of :func:`deletion_curve`, levels
``fractions``):

- "fame" (default): in [0, 1] pixel space, removed pixels become 0 (black) and insertion starts
  from torchvision's Gaussian blur (kernel 11, sigma 5, reflect padding); 11 levels
  (:data:`DEFAULT_FRACTIONS`); ties in raster order.
- "rise": RISE's ``CausalMetric``. Its substrates live in the model's mean/std-normalized input:
  deletion sets it to 0, i.e. the mean colour in pixels; insertion starts from RISE's blur of it,
  a 2-D convolution with zero padding whose 11 x 11 kernel is scipy's ``gaussian_filter`` (sigma
  5, truncated at 4 sigma, reflect mode) of a centred unit impulse (:func:`rise_kernel`); in pixels
  that is the blur padded with the mean colour. One row of pixels (W) per step: H + 1 levels
  (:func:`rise_fractions`, 225 at 224 px). Pixels in descending saliency as RISE's
  ``flip(argsort(map))``: tied values in reverse raster order. RISE's AUC (sum of the points
  minus half the first and last, divided by the number of steps) is :func:`curve_auc` over these
  equally spaced levels. The class is the one the map explains (RISE's code: the top-1 class,
  i.e. maps made with ``target=prediction``).

Pixel order is a stable ranking of the map: most relevant first sorts descending, least relevant
first ascending, and tied values keep raster order in both (protocol "fame"). At a fraction f of
N pixels the ``round(f * N)`` (halves rounded up) first-ranked pixels are affected.

``verification_curve`` applies the same removal to face verification (the FAME paper's Tab. 2).

Every function is batched and runs on the device of its inputs. Pass a model in eval mode: with
batch-dependent layers (BatchNorm in training mode) no metric can be independent of batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))
"""0, 0.1, ..., 1: the eleven removal levels of the paper and of the ROAD protocol."""

RISE_BLUR_KERNEL = 11
RISE_BLUR_SIGMA = 5.0
#: scipy.ndimage.gaussian_filter's default truncation, in sigmas, used by RISE's kernel.
RISE_BLUR_TRUNCATE = 4.0
#: Deletion / insertion protocols: ours and Petsiuk et al.'s CausalMetric (module docstring).
SUBSTRATES = ("fame", "rise")


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
        raise ValueError(
            f"{name} must hold one class index per image, shape ({num_samples},), got {tuple(targets.shape)}"
        )
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


def pixel_ranks(maps: Tensor, most_relevant_first: bool = True, ties_reversed: bool = False) -> Tensor:
    """Removal rank of each pixel (B, 1, H, W), 0 = removed first; stable, ties in raster order,
    or in reverse raster order with ``ties_reversed`` (the reverse of the opposite sort, RISE's order)."""
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    flat = maps.flatten(1).float()
    if ties_reversed:
        order = torch.sort(flat, dim=1, descending=not most_relevant_first, stable=True).indices.flip(1)
    else:
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
    """Our insertion baseline ("fame"): torchvision Gaussian blur, kernel 11, sigma 5, reflect padding."""
    return gaussian_blur(images, [RISE_BLUR_KERNEL, RISE_BLUR_KERNEL], [RISE_BLUR_SIGMA, RISE_BLUR_SIGMA])


def rise_kernel(dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """RISE's 11 x 11 blur kernel: scipy's ``gaussian_filter(impulse, 5)`` of a centred unit impulse.

    The filter is separable, so the kernel is the outer product of its 1-D response: Gaussian
    weights on offsets -20..20 (truncated at 4 sigma) summed to 1, folded back into the 11 samples
    by scipy's "reflect" boundary (d c b a | a b c d | d c b a). It sums to 1.
    """
    size, centre = RISE_BLUR_KERNEL, RISE_BLUR_KERNEL // 2
    radius = int(RISE_BLUR_TRUNCATE * RISE_BLUR_SIGMA + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / RISE_BLUR_SIGMA) ** 2)
    weights = weights / weights.sum()
    response = torch.zeros(size, dtype=torch.float64)
    for position in range(size):
        sources = (position + offsets.long()) % (2 * size)  # reflect: period 2 * size, mirrored half
        sources = torch.where(sources >= size, 2 * size - 1 - sources, sources)
        response[position] = weights[sources == centre].sum()
    return torch.outer(response, response).to(dtype=dtype, device=device)


def normalized_zero(images: Tensor, mean: Optional[Union[Sequence[float], Tensor]]) -> Tensor:
    """The pixel colour (1, C, 1, 1) the model's input normalization maps to 0: ``mean`` (None: black)."""
    channels = images.shape[1]
    if mean is None:
        return torch.zeros(1, channels, 1, 1, dtype=images.dtype, device=images.device)
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1)
    if mean.numel() != channels:
        raise ValueError(f"mean must hold one value per channel ({channels}), got {mean.tolist()}")
    return mean.view(1, channels, 1, 1)


def rise_substrate_blur(images: Tensor, mean: Optional[Union[Sequence[float], Tensor]] = None) -> Tensor:
    """RISE's insertion start in pixels: its blur (:func:`rise_kernel`, zero padding) of the
    normalized image, mapped back. Per channel, blur((x - m) / s) * s + m = blur(x - m) + m, so
    only the mean ``mean`` (the colour normalization maps to 0; None: black) matters."""
    zero = normalized_zero(images, mean)
    channels = images.shape[1]
    kernel = rise_kernel(images.dtype, images.device).expand(channels, 1, -1, -1)
    return F.conv2d(images - zero, kernel, padding=RISE_BLUR_KERNEL // 2, groups=channels) + zero


def rise_fractions(height: int, width: int, step: Optional[int] = None) -> Tuple[float, ...]:
    """RISE's levels: ``step`` pixels per step (default W, one row), ceil(H W / step) steps,
    min(i step, H W) / (H W) for i = 0..steps (H + 1 levels for the default step)."""
    total = int(height) * int(width)
    step = int(width) if step is None else int(step)
    if step < 1:
        raise ValueError(f"step must be a positive number of pixels, got {step}")
    steps = (total + step - 1) // step
    return tuple(min(i * step, total) / total for i in range(steps + 1))


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
    substrate: str = "fame",
    mean: Optional[Union[Sequence[float], Tensor]] = None,
) -> Tensor:
    """Softmax probability of the target class (B, len(fractions)) along a deletion / insertion curve.

    ``mode="deletion"``: the top f of pixels (map order, most relevant first) replaced by the
    baseline; ``mode="insertion"``: the baseline image with the top f of pixels restored.
    ``baseline`` is "zero" or "blur"; by default deletion uses "zero" and insertion "blur" as in
    RISE. ``substrate`` picks the protocol (module docstring): "fame" (zero = black, torchvision
    blur, ties in raster order) or "rise" (zero and blur in the normalized input, where ``mean``,
    the per-channel mean of the model's input normalization (None: none), is 0; ties in reverse
    raster order); ``mean`` is read by "rise" only. :func:`rise_fractions` gives RISE's levels.
    ``batch_size`` bounds the images per forward pass (default B).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if substrate not in SUBSTRATES:
        raise ValueError(f"substrate must be one of {', '.join(SUBSTRATES)}, got {substrate!r}")
    baseline = baseline or ("zero" if mode == "deletion" else "blur")
    if baseline == "zero":
        reference = normalized_zero(images, mean).expand_as(images) if substrate == "rise" else torch.zeros_like(images)
    elif baseline == "blur":
        reference = rise_substrate_blur(images, mean) if substrate == "rise" else rise_blur(images)
    else:
        raise ValueError(f"baseline must be 'zero' or 'blur', got {baseline!r}")
    maps = _check_maps(images, maps)
    targets = _check_targets(targets, images.shape[0])
    ranks = pixel_ranks(maps, most_relevant_first=True, ties_reversed=substrate == "rise")
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
        raise ValueError(
            f"galleries and probes must have the same shape, got {tuple(galleries.shape)} and {tuple(probes.shape)}"
        )
    maps = _check_maps(probes, maps)
    same = torch.as_tensor(same).to(probes.device)
    if same.dim() != 1 or same.shape[0] != probes.shape[0]:
        raise ValueError(
            f"same must hold one genuine/impostor flag per pair, shape ({probes.shape[0]},), got {tuple(same.shape)}"
        )
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
