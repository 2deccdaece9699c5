"""Ground-truth localisation scores of attribution maps against evidence masks
(docs/method.md#localisation).

All functions take maps (B, 1, H, W) or (B, H, W) and binary masks of the same spatial size and
return one score per sample as a tensor on the maps' device.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor


def _flatten_pair(maps: Tensor, masks: Tensor):
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"maps must have shape (B, 1, H, W) or (B, H, W), got {tuple(maps.shape)}")
        maps = maps[:, 0]
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must have shape (B, 1, H, W) or (B, H, W), got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"maps and masks must share shape (B, H, W); got maps {tuple(maps.shape)}, masks {tuple(masks.shape)}"
        )
    return maps.flatten(1).float(), (masks.flatten(1) > 0.5).to(maps.device)


STANDARD_TOLERANCE_PX = 15.0
"""Zhang et al.'s pointing-game tolerance: 15 px at 224 px (also TorchRay's)."""


def standard_tolerance(height: int, width: int) -> float:
    """The 15 px at 224 px tolerance scaled to an image of this size (by its shorter side)."""
    return STANDARD_TOLERANCE_PX * min(height, width) / 224


def pointing_game(maps: Tensor, masks: Tensor, tolerance: Union[float, str] = 0.0) -> Tensor:
    """1.0 where the map's maximum falls inside the mask or within ``tolerance`` pixels of it, else 0.0.

    ``tolerance`` is a Euclidean distance in pixels (a circular neighbourhood, as Zhang et al.
    2018 and TorchRay) or "standard" for 15 px at 224 px scaled to the map size
    (``standard_tolerance``). Tied maxima: the first in raster order is the point (torch.argmax);
    Quantus instead counts a hit when any tied maximum is inside. Zhang et al. report the mean per
    class, then over classes (``class_mean``); the pipeline's tables use ``tolerance=0``
    ("pointing_game", the synthetic masks are exact) and the standard tolerance
    ("pointing_game_15px"), both averaged over samples.
    """
    values, hits = _flatten_pair(maps, masks)
    height, width = maps.shape[-2:]
    if tolerance == "standard":
        tolerance = standard_tolerance(height, width)
    elif isinstance(tolerance, str):
        raise ValueError(f"tolerance must be a number of pixels or 'standard', got {tolerance!r}")
    peak = values.argmax(dim=1, keepdim=True)
    if tolerance <= 0:
        return hits.gather(1, peak).squeeze(1).float()
    rows = torch.arange(height, device=values.device).repeat_interleave(width)
    cols = torch.arange(width, device=values.device).repeat(height)
    squared = (rows - rows[peak]) ** 2 + (cols - cols[peak]) ** 2  # (B, H*W) from the peak
    return ((squared <= tolerance**2) & hits).any(dim=1).float()


def class_mean(scores: Tensor, labels: Tensor) -> Tensor:
    """Mean of the per-class means of ``scores`` (N,) grouped by ``labels`` (N,) (Zhang et al.'s averaging)."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(classes.numel(), dtype=torch.float64, device=scores.device).index_add_(
        0, inverse, scores.double()
    )
    counts = torch.bincount(inverse, minlength=classes.numel())
    return (sums / counts).mean().to(scores.dtype)


def relevance_mass_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the map's positive mass inside the mask (Arras et al. 2022); 0 for an empty map.

    Negative values are clipped to 0 (the paper's positive relevance); Quantus'
    ``RelevanceMassAccuracy`` sums the raw values, which agrees for non-negative maps.
    """
    values, hits = _flatten_pair(maps, masks)
    values = values.clamp(min=0)
    total = values.sum(dim=1)
    inside = (values * hits).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(values.dtype).tiny), torch.zeros_like(total))


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the K highest-ranked pixels inside the mask, K = mask size (Arras et al. 2022).

    Ties are broken by raster order (a stable descending sort; Quantus' unstable ``np.argsort``
    breaks them arbitrarily). An empty mask scores 0 here, NaN in Quantus.
    """
    values, hits = _flatten_pair(maps, masks)
    sizes = hits.sum(dim=1)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    ranked_hits = hits.gather(1, order).float()
    rank = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    top = (rank < sizes.unsqueeze(1)).float()
    return torch.where(
        sizes > 0, (ranked_hits * top).sum(dim=1) / sizes.clamp(min=1), torch.zeros_like(sizes, dtype=values.dtype)
    )


def top_k_intersection(maps: Tensor, masks: Tensor, k: int) -> Tensor:
    """Share of the map's ``k`` highest-ranked pixels that lie inside the mask (Theiner et al. 2021).

    Ties are broken by raster order (stable sort); Quantus' ``TopKIntersection`` uses an unstable
    ``np.argsort``. An empty mask scores 0 here, NaN in Quantus.
    """
    values, hits = _flatten_pair(maps, masks)
    if not 0 < k <= values.shape[1]:
        raise ValueError(f"k must lie in 1..{values.shape[1]} (pixels per map), got {k}")
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return hits.gather(1, order).float().mean(dim=1)


def threshold_iou(maps: Tensor, masks: Tensor, threshold: float) -> Tensor:
    """IoU between {map >= threshold} and the mask (the paper's Tab. 1 uses t in {0.3, 0.5, 0.7}).

    Against ground-truth boxes, pass ``boxes_to_masks(boxes, size)`` as the masks. 0 when both
    sets are empty.
    """
    values, hits = _flatten_pair(maps, masks)
    selected = values >= threshold
    intersection = (selected & hits).sum(dim=1).float()
    union = (selected | hits).sum(dim=1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def boxes_to_masks(boxes: Union[Tensor, Sequence[Tensor]], size: Tuple[int, int]) -> Tensor:
    """Binary masks (B, 1, H, W) of the union of each sample's boxes.

    ``boxes`` is a tensor (B, 4) with one box per sample or a sequence of B tensors (N_i, 4),
    as (x_min, y_min, x_max, y_max) in pixel coordinates of the (resized) image, the image spanning
    [0, W] x [0, H]. A pixel belongs to a box when its centre (x + 0.5, y + 0.5) lies inside.
    """
    if isinstance(boxes, Tensor) and boxes.dim() == 2:
        boxes = [box.unsqueeze(0) for box in boxes]
    height, width = size
    masks = []
    for sample_boxes in boxes:
        sample_boxes = torch.as_tensor(sample_boxes, dtype=torch.float32)
        if sample_boxes.shape[-1:] != (4,) or sample_boxes.dim() > 2:
            raise ValueError(
                f"boxes must be (x_min, y_min, x_max, y_max): a tensor (B, 4) or B tensors (N_i, 4), "
                f"got a sample's boxes of shape {tuple(sample_boxes.shape)}"
            )
        sample_boxes = sample_boxes.reshape(-1, 4)
        ys = torch.arange(height, device=sample_boxes.device, dtype=torch.float32) + 0.5
        xs = torch.arange(width, device=sample_boxes.device, dtype=torch.float32) + 0.5
        x0, y0, x1, y1 = (sample_boxes[:, i].view(-1, 1, 1) for i in range(4))
        inside = (
            (ys.view(1, -1, 1) >= y0)
            & (ys.view(1, -1, 1) <= y1)
            & (xs.view(1, 1, -1) >= x0)
            & (xs.view(1, 1, -1) <= x1)
        )
        masks.append(inside.any(dim=0, keepdim=True).float())
    return torch.stack(masks)


def pr_auc(maps: Tensor, masks: Tensor) -> Tensor:
    """Area under the precision-recall curve of the map's values as scores for the mask's pixels.

    The average precision AP = sum over thresholds of (R_n - R_(n-1)) P_n, thresholds at the
    distinct map values (tied pixels enter together, as scikit-learn's
    ``average_precision_score``). It rewards ranking the mask first without a threshold; a
    uniform map scores the mask's share of the image. 0 for an empty mask.
    """
    values, hits = _flatten_pair(maps, masks)
    ordered, order = torch.sort(values, dim=1, descending=True, stable=True)
    ranked_hits = hits.gather(1, order).to(values.dtype)
    true_positives = ranked_hits.cumsum(dim=1)
    # precision is read at the end of each group of tied values
    group_end = torch.searchsorted(-ordered.contiguous(), -ordered.contiguous(), right=True) - 1
    precision_at_end = true_positives.gather(1, group_end) / (group_end + 1).to(values.dtype)
    positives = ranked_hits.sum(dim=1)
    ap = (ranked_hits * precision_at_end).sum(dim=1) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.zeros_like(ap))


LOCALIZATION_METRICS = {
    "pointing_game": pointing_game,
    "pointing_game_15px": partial(pointing_game, tolerance="standard"),
    "relevance_mass": relevance_mass_accuracy,
    "relevance_rank": relevance_rank_accuracy,
    "pr_auc": pr_auc,
    "iou_30": partial(threshold_iou, threshold=0.3),
    "iou_50": partial(threshold_iou, threshold=0.5),
    "iou_70": partial(threshold_iou, threshold=0.7),
}
"""Registry name -> fn(maps, masks) -> (B,) scores, as the evaluate stage reads them."""
