"""Ground-truth localisation scores of attribution maps against evidence masks (DESIGN.md sec. 3).

All functions take maps (B, 1, H, W) or (B, H, W) and binary masks of the same spatial size and
return one score per sample as a tensor on the maps' device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _flatten_pair(maps: Tensor, masks: Tensor):
    if maps.dim() == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"maps must have shape (B, 1, H, W) or (B, H, W), got {tuple(maps.shape)}")
        maps = maps[:, 0]
    if masks.dim() == 4:
        masks = masks[:, 0]
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"maps and masks must share shape (B, H, W); got maps {tuple(maps.shape)}, masks {tuple(masks.shape)}"
        )
    return maps.flatten(1).float(), (masks.flatten(1) > 0.5).to(maps.device)


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """1.0 where the map's maximum (first in raster order) falls inside the mask, else 0.0.

    ``tolerance`` > 0 dilates the mask by that many pixels (a square neighbourhood), the
    tolerance of Zhang et al.'s pointing game.
    """
    if tolerance > 0:
        spatial = masks if masks.dim() == 4 else masks.unsqueeze(1)
        masks = F.max_pool2d((spatial > 0.5).float(), 2 * tolerance + 1, stride=1, padding=tolerance)
    values, hits = _flatten_pair(maps, masks)
    peak = values.argmax(dim=1, keepdim=True)
    return hits.gather(1, peak).squeeze(1).float()


def relevance_mass_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the map's (non-negative) mass inside the mask (Arras et al. 2022); 0 for an empty map."""
    values, hits = _flatten_pair(maps, masks)
    values = values.clamp(min=0)
    total = values.sum(dim=1)
    inside = (values * hits).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(values.dtype).tiny), torch.zeros_like(total))


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the K highest-ranked pixels inside the mask, K = mask size (Arras et al. 2022).

    Ties are broken by raster order (a stable descending sort).
    """
    values, hits = _flatten_pair(maps, masks)
    sizes = hits.sum(dim=1)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    ranked_hits = hits.gather(1, order).float()
    rank = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    top = (rank < sizes.unsqueeze(1)).float()
    return torch.where(sizes > 0, (ranked_hits * top).sum(dim=1) / sizes.clamp(min=1), torch.zeros_like(sizes, dtype=values.dtype))


def top_k_iou(maps: Tensor, masks: Tensor, k: Optional[int] = None) -> Tensor:
    """IoU between the k highest-ranked pixels (default k = mask size per sample) and the mask."""
    values, hits = _flatten_pair(maps, masks)
    sizes = hits.sum(dim=1) if k is None else torch.full((values.shape[0],), int(k), device=values.device)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(values.shape[1], device=values.device).expand_as(order))
    selected = rank < sizes.unsqueeze(1)
    intersection = (selected & hits).sum(dim=1).float()
    union = (selected | hits).sum(dim=1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def threshold_iou(maps: Tensor, masks: Tensor, threshold: float) -> Tensor:
    """IoU between {map >= threshold} and the mask (the paper's Tab. 1 uses t in {0.3, 0.5, 0.7})."""
    values, hits = _flatten_pair(maps, masks)
    selected = values >= threshold
    intersection = (selected & hits).sum(dim=1).float()
    union = (selected | hits).sum(dim=1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


LOCALIZATION_METRICS = {
    "pointing_game": pointing_game,
    "relevance_mass": relevance_mass_accuracy,
    "relevance_rank": relevance_rank_accuracy,
    "top_k_iou": top_k_iou,
}
