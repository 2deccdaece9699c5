"""CorrRISE for face verification (Lu, Xu & Ebrahimi, WACV 2024).

N masks (500), each a keep-indicator that is 1 everywhere except 3 black square patches (30 x 30
at 112 px) placed uniformly and fully inside the image (patches may overlap). One mask set, drawn
from a seed, is shared by all pairs. For pair b and mask i the similarity

    s_bi = cos(phi(x_b * M_i), phi_ref_b)

is computed per masked image against the frozen reference embedding. Each pixel's keep-indicator
M_i(pixel) is correlated over i with the scores by Spearman's rank correlation: the Pearson
correlation of the rank-transformed scores (average ranks for ties) with the ranked indicator;
ranking a binary indicator is an affine map, so the indicator itself is used. A pixel that no mask
covers (constant indicator) or a pair with constant scores has no correlation and gets 0.

    e+ = max(rho, 0)   (keeping the pixel goes with a higher similarity: "similar")
    e- = max(-rho, 0)  ("dissimilar")

No blur. Each map is normalized on its own ("max" by default: divided by its maximum, so 0 stays
"no correlation"; "minmax" is available).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine import check_images, normalize_maps
from .fame import embed
from .guard import explaining

#: The paper's patch side at the 112 x 112 face crops it was defined for.
PATCH_SIZE_AT_112 = 30


def corrrise_patch_size(size: Tuple[int, int]) -> int:
    """30 px at 112 px, scaled to the shorter side of other image sizes (at least 1 px)."""
    return max(1, round(PATCH_SIZE_AT_112 * min(size) / 112))


def corrrise_masks(
    count: int,
    size: Tuple[int, int],
    patches: int = 3,
    patch_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Keep-indicators (N, H, W) as booleans: False inside each of ``patches`` square patches of
    side ``patch_size`` (None: :func:`corrrise_patch_size`) whose top-left corner is uniform over
    the positions that keep the patch inside the image. Drawn on the generator's device."""
    height, width = size
    patch_size = corrrise_patch_size(size) if patch_size is None else int(patch_size)
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(
            f"CorrRISE patch_size must be in [1, {min(height, width)}] for {height}x{width} images, got {patch_size}"
        )
    if int(count) < 2 or int(patches) < 1:
        raise ValueError(f"CorrRISE needs at least 2 masks and 1 patch per mask, got masks={count}, patches={patches}")
    device = generator.device if generator is not None else torch.device("cpu")
    tops = torch.randint(0, height - patch_size + 1, (count, patches), generator=generator, device=device)
    lefts = torch.randint(0, width - patch_size + 1, (count, patches), generator=generator, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    inside_rows = (rows >= tops[..., None]) & (rows < tops[..., None] + patch_size)  # (N, P, H)
    inside_cols = (cols >= lefts[..., None]) & (cols < lefts[..., None] + patch_size)  # (N, P, W)
    covered = (inside_rows[..., :, None] & inside_cols[..., None, :]).any(dim=1)
    return ~covered


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..N along the last dimension, ties sharing their average rank (scipy's rankdata)."""
    below = (values[..., None, :] < values[..., :, None]).sum(dim=-1)
    equal = (values[..., None, :] == values[..., :, None]).sum(dim=-1)
    return below.to(values.dtype) + (equal.to(values.dtype) + 1) / 2


def keep_score_correlation(keep: Tensor, scores: Tensor) -> Tensor:
    """Spearman correlation (B, H, W) of each pixel's keep-indicator (N, H, W) with scores (B, N);
    0 where either side is constant."""
    count = keep.shape[0]
    indicator = keep.flatten(1).to(scores.dtype)
    indicator = indicator - indicator.mean(dim=0)
    ranks = average_ranks(scores)
    ranks = ranks - ranks.mean(dim=1, keepdim=True)
    covariance = ranks @ indicator / count
    spread = ranks.pow(2).mean(dim=1, keepdim=True).sqrt() * indicator.pow(2).mean(dim=0).sqrt()
    correlation = torch.where(spread > 0, covariance / torch.where(spread > 0, spread, 1.0), 0.0)
    return correlation.view(-1, *keep.shape[1:])


def masked_similarities(
    model: nn.Module, images: Tensor, reference_embeddings: Tensor, keep: Tensor, fill: float, batch_size: int
) -> Tensor:
    """cos(phi(x_b * M_i + fill * (1 - M_i)), phi_ref_b) for every pair b and mask i: (B, N)."""
    batch = images.shape[0]
    count = keep.shape[0]
    masks_per_pass = max(1, int(batch_size) // batch)
    references = F.normalize(reference_embeddings, dim=1)
    scores = []
    for start in range(0, count, masks_per_pass):
        chunk = keep[start : start + masks_per_pass, None].to(images.dtype)
        masked = (images[:, None] * chunk[None] + fill * (1 - chunk[None])).flatten(0, 1)
        embeddings = F.normalize(model(masked), dim=1).view(batch, chunk.shape[0], -1)
        scores.append(torch.einsum("bmd,bd->bm", embeddings, references.to(embeddings.dtype)))
    return torch.cat(scores, dim=1)


def corrrise_maps(
    model: nn.Module,
    images: Tensor,
    references: Tensor,
    masks: int = 500,
    patches: int = 3,
    patch_size: Optional[int] = None,
    fill: float = 0.0,
    batch_size: int = 256,
    normalization: str = "max",
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """CorrRISE maps {"similar": e+, "dissimilar": e-}, each (B, 1, H, W) in [0, 1].

    ``references`` (B, C, H', W') are the other images of the pairs, one per image; their
    embeddings are computed once and frozen. Masked pixels are set to ``fill`` (0: black for
    models taking [0, 1] pixels). ``batch_size`` masked images go through the model per pass.
    """
    check_images(images)
    check_images(references, "references")
    if references.shape[0] != images.shape[0]:
        raise ValueError(f"references must hold one image per image ({images.shape[0]}), got {references.shape[0]}")
    keep = corrrise_masks(masks, tuple(images.shape[-2:]), patches, patch_size, generator).to(images.device)
    with explaining(model), torch.no_grad():
        reference_embeddings = embed(model, references.detach().clone())
        scores = masked_similarities(model, images.detach().clone(), reference_embeddings, keep, fill, batch_size)
    correlation = keep_score_correlation(keep, scores.to(images.dtype)).unsqueeze(1)
    return {
        "similar": normalize_maps(correlation.clamp(min=0), normalization),
        "dissimilar": normalize_maps((-correlation).clamp(min=0), normalization),
    }


__all__ = [
    "PATCH_SIZE_AT_112",
    "average_ranks",
    "corrrise_maps",
    "corrrise_masks",
    "corrrise_patch_size",
    "keep_score_correlation",
    "masked_similarities",
]
