"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

N random masks M_i are drawn as in the paper: an s x s grid of cells, each kept with probability
p, upsampled bilinearly (half-pixel centres, mirrored borders, as the paper's skimage resize)
to (s + 1) * ceil(H / s) and cropped to H x W at a random shift in
[0, ceil(H / s)) per axis, so the smooth masks do not all share the grid's phase. The saliency of
class o is the Monte-Carlo estimate of E[f_o(I * M) | M(pixel) = 1] (paper Eq. 6):

    S_o = sum_i f_o(I * M_i) * M_i / (N * p)

with f_o the softmax probability of class o. The image is multiplied by the mask in the space
``images`` live in (as the paper does with the network's preprocessed input).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .engine import check_images, normalize_maps
from .fame import _check_targets
from .guard import explaining

RISE_SCORES = ("probability", "logit")


def draw_rise_grids(
    count: int, grid_size: int, probability: float, size: Tuple[int, int], generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """The random part of N RISE masks: binary grids (N, s, s) and crop shifts (N, 2) (row, col).

    Drawn on the generator's device (CPU by default), so a seed gives the same masks everywhere.
    """
    if int(count) < 1 or int(grid_size) < 1:
        raise ValueError(f"RISE needs at least one mask and one grid cell, got masks={count}, grid_size={grid_size}")
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"RISE probability must be in (0, 1], got {probability}")
    device = generator.device if generator is not None else torch.device("cpu")
    grids = (torch.rand(count, grid_size, grid_size, generator=generator, device=device) < probability).float()
    cells = [math.ceil(side / grid_size) for side in size]
    shifts = torch.stack(
        [torch.randint(0, cell, (count,), generator=generator, device=device) for cell in cells], dim=1
    )
    return grids, shifts


def bilinear_matrix(in_size: int, out_size: int, device=None, dtype=torch.float32) -> Tensor:
    """(out, in) matrix of 1-D linear interpolation with half-pixel centres and mirrored borders:
    what the paper's ``skimage.transform.resize(order=1, mode="reflect", anti_aliasing=False)`` does."""
    coordinates = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * in_size / out_size - 0.5
    coordinates = coordinates.abs()
    coordinates = torch.where(coordinates > in_size - 1, 2 * (in_size - 1) - coordinates, coordinates).clamp(
        0, in_size - 1
    )
    low = coordinates.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    weight = coordinates - low
    matrix = torch.zeros(out_size, in_size, device=device, dtype=torch.float64)
    rows = torch.arange(out_size, device=device)
    matrix.index_put_((rows, low), 1 - weight, accumulate=True)
    matrix.index_put_((rows, high), weight, accumulate=True)
    return matrix.to(dtype)


def upsample_rise_masks(grids: Tensor, shifts: Tensor, size: Tuple[int, int]) -> Tensor:
    """Smooth masks (n, 1, H, W): each grid upsampled bilinearly to (s + 1) * ceil(side / s) per
    axis (:func:`bilinear_matrix`) and cropped at its shift."""
    height, width = size
    grid_size = grids.shape[-1]
    up_height, up_width = ((grid_size + 1) * math.ceil(side / grid_size) for side in size)
    row_matrix = bilinear_matrix(grid_size, up_height, grids.device, grids.dtype)
    col_matrix = bilinear_matrix(grid_size, up_width, grids.device, grids.dtype)
    rows = shifts[:, 0, None] + torch.arange(height, device=grids.device)  # (n, H)
    cols = shifts[:, 1, None] + torch.arange(width, device=grids.device)  # (n, W)
    return (row_matrix[rows] @ grids @ col_matrix[cols].transpose(1, 2)).unsqueeze(1)


def class_scores(logits: Tensor, targets: Tensor, score: str) -> Tensor:
    """f_o of each row: the softmax probability (or the logit) of its target class."""
    if score == "probability":
        logits = logits.softmax(dim=1)
    elif score != "logit":
        raise ValueError(f"unknown RISE score {score!r}; choose one of {', '.join(map(repr, RISE_SCORES))}")
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def rise_maps(
    model: nn.Module,
    images: Tensor,
    targets: Union[Tensor, Sequence[int], int],
    masks: int = 4000,
    grid_size: int = 7,
    probability: float = 0.5,
    score: str = "probability",
    batch_size: int = 256,
    normalization: str = "minmax",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """RISE saliency maps (B, 1, H, W) of class ``targets``, normalized per map.

    One mask set (drawn from ``generator``) serves the whole batch, so a sample's map does not
    depend on the batch it is in. ``batch_size`` images (masked copies) go through the model per
    forward pass. Defaults are the paper's ImageNet settings (N = 4000, s = 7, p = 0.5).
    """
    check_images(images)
    batch, _, height, width = images.shape
    targets = _check_targets(targets, batch, images.device)
    grids, shifts = draw_rise_grids(masks, grid_size, probability, (height, width), generator)
    grids, shifts = grids.to(images.device, images.dtype), shifts.to(images.device)
    masks_per_pass = max(1, int(batch_size) // batch)
    with explaining(model), torch.no_grad():
        saliency = torch.zeros(batch, height, width, device=images.device, dtype=images.dtype)
        source = images.detach().clone()
        for start in range(0, masks, masks_per_pass):
            chunk = upsample_rise_masks(
                grids[start : start + masks_per_pass], shifts[start : start + masks_per_pass], (height, width)
            )
            masked = (source[:, None] * chunk[None]).flatten(0, 1)
            logits = model(masked)
            scores = class_scores(logits, targets.repeat_interleave(chunk.shape[0]), score).view(batch, -1)
            saliency += torch.einsum("bm,mhw->bhw", scores.to(images.dtype), chunk[:, 0])
    saliency = saliency / (masks * probability)
    return normalize_maps(saliency.unsqueeze(1), normalization)


__all__ = ["RISE_SCORES", "bilinear_matrix", "class_scores", "draw_rise_grids", "rise_maps", "upsample_rise_masks"]
