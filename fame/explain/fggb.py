"""FGGB for face verification (Lu, Xu & Ebrahimi, FG 2024).

With e = phi(x) / ||phi(x)|| the L2-normalized embedding of the explained image (D dimensions)
and r = phi_ref / ||phi_ref|| the frozen reference:

    G_k   = mean_c |d f_k / d x_c|             one gradient map per embedding dimension k
    G_k  <- G_k / ||G_k||_2                    each map L2-normalized over its pixels
    v     = e * r                              elementwise, so sum_k v_k = cos(phi(x), phi_ref)
    S     = sum_k (v_k - theta / D) G_k        theta the verification (EER) threshold
    e+    = blur(max(S, 0)),  e- = blur(max(-S, 0))

The differentiated feature f is chosen by ``gradient_of``: "normalized" (default) takes f = e, the
L2-normalized embedding, as the FAME authors' comparison did; "raw" takes f = phi(x), the raw
feature, as Lu, Xu and Ebrahimi's paper writes it. The maps differ because d e_k / d x mixes in
the gradients of every other dimension through the norm. The weights v_k use e in both cases.

Summed over k the weights give cos - theta: a pair above the threshold leans to e+, one below it
to e-. The positive and negative parts are split first and each is blurred (Gaussian, kernel 25,
sigma 5 at 112 px; torchvision semantics), then normalized per map ("max" by default, as for
CorrRISE; "minmax" is available). The D gradients are batched by running K copies of each image
and backpropagating a different dimension from each copy (on CPU 2x faster than a loop over D
and 5x faster than a vmapped backward, ``is_grads_batched``, measured on the small IResNet).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine import blur_maps, check_images, normalize_maps
from .fame import embed
from .guard import explaining

#: The paper's blur at the 112 x 112 face crops it was defined for.
BLUR_KERNEL_AT_112 = 25
BLUR_SIGMA_AT_112 = 5.0
#: The verification threshold theta used when none is given: the order of the EER thresholds of
#: ArcFace-style models on LFW-like pairs. Set it to the explained model's own EER threshold
#: (fame.metrics.verification.eer_threshold on clean pair scores).
DEFAULT_THRESHOLD = 0.3
#: The feature FGGB differentiates: the L2-normalized embedding or the raw feature phi(x).
GRADIENT_OF = ("normalized", "raw")


def fggb_blur(size: Tuple[int, int]) -> Tuple[int, float]:
    """Kernel 25 and sigma 5 at 112 px, scaled to the shorter side of other sizes (kernel odd)."""
    scale = min(size) / 112
    return max(1, round(BLUR_KERNEL_AT_112 * scale)) | 1, BLUR_SIGMA_AT_112 * scale


def check_gradient_of(gradient_of: str) -> str:
    """``gradient_of`` as given, or a ValueError naming the allowed values."""
    if gradient_of not in GRADIENT_OF:
        raise ValueError(f"gradient_of must be one of {', '.join(GRADIENT_OF)}, got {gradient_of!r}")
    return gradient_of


def weighted_gradient_sum(
    model: nn.Module,
    images: Tensor,
    reference: Tensor,
    threshold: float,
    batch_size: int = 256,
    gradient_of: str = "normalized",
) -> Tensor:
    """S = sum_k (v_k - theta / D) G_k, shape (B, 1, H, W), for L2-normalized references (B, D).

    G_k is the gradient map of dimension k of the normalized embedding or of the raw feature
    (``gradient_of`` "normalized" or "raw").

    Each pass runs K = batch_size // B copies of every image and backpropagates dimension
    start + j from copy j, so one backward gives K gradient maps per image; the maps are summed
    as they come, so memory grows with ``batch_size``, not with D. Exact because the model runs
    in eval mode (samples do not interact). The caller guards the model.
    """
    check_gradient_of(gradient_of)
    batch = images.shape[0]
    with torch.no_grad():
        embeddings = F.normalize(model(images), dim=1)
    if reference.shape != embeddings.shape:
        raise ValueError(
            f"the reference embeddings have shape {tuple(reference.shape)}, the images' {tuple(embeddings.shape)}"
        )
    dims = embeddings.shape[1]
    weights = embeddings * reference.to(embeddings.dtype) - threshold / dims
    dims_per_pass = max(1, int(batch_size) // batch)
    combined = torch.zeros(batch, *images.shape[-2:], device=images.device, dtype=images.dtype)
    for start in range(0, dims, dims_per_pass):
        count = min(dims_per_pass, dims - start)
        copies = images.repeat_interleave(count, dim=0).requires_grad_(True)
        features = model(copies)
        if gradient_of == "normalized":
            features = F.normalize(features, dim=1)
        copy_embeddings = features.view(batch, count, dims)
        chosen = torch.arange(count, device=images.device)
        (gradients,) = torch.autograd.grad(copy_embeddings[:, chosen, start + chosen].sum(), copies)
        maps = gradients.view(batch, count, *images.shape[1:]).abs().mean(dim=2)  # (B, K, H, W)
        norms = maps.flatten(2).norm(dim=2)[..., None, None]
        maps = maps / torch.where(norms > 0, norms, torch.ones_like(norms))
        combined += torch.einsum("bkhw,bk->bhw", maps, weights[:, start : start + count].to(maps.dtype))
    return combined.unsqueeze(1)


def fggb_maps(
    model: nn.Module,
    images: Tensor,
    references: Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    blur_kernel: Optional[int] = None,
    blur_sigma: Optional[float] = None,
    normalization: str = "max",
    batch_size: int = 256,
    gradient_of: str = "normalized",
) -> Dict[str, Tensor]:
    """FGGB maps {"similar": e+, "dissimilar": e-}, each (B, 1, H, W) in [0, 1].

    ``references`` are the other images of the pairs, one per image (embeddings frozen);
    ``threshold`` is theta; ``blur_kernel`` / ``blur_sigma`` None scale the paper's 25 / 5 at
    112 px to the image size (:func:`fggb_blur`); ``blur_kernel=0`` skips the blur;
    ``batch_size`` image copies go through the model per pass; ``gradient_of`` is the feature
    differentiated, "normalized" (the embedding e) or "raw" (phi(x)).
    """
    check_images(images)
    check_images(references, "references")
    if references.shape[0] != images.shape[0]:
        raise ValueError(f"references must hold one image per image ({images.shape[0]}), got {references.shape[0]}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    check_gradient_of(gradient_of)
    default_kernel, default_sigma = fggb_blur(tuple(images.shape[-2:]))
    kernel = default_kernel if blur_kernel is None else (int(blur_kernel) or None)
    sigma = default_sigma if blur_sigma is None else float(blur_sigma)
    with explaining(model):
        reference = F.normalize(embed(model, references.detach().clone()), dim=1)
        combined = weighted_gradient_sum(
            model, images.detach().clone(), reference, float(threshold), int(batch_size), gradient_of
        )
    return {
        "similar": normalize_maps(blur_maps(combined.clamp(min=0), kernel, sigma), normalization),
        "dissimilar": normalize_maps(blur_maps((-combined).clamp(min=0), kernel, sigma), normalization),
    }


__all__ = [
    "BLUR_KERNEL_AT_112",
    "BLUR_SIGMA_AT_112",
    "DEFAULT_THRESHOLD",
    "GRADIENT_OF",
    "check_gradient_of",
    "fggb_blur",
    "fggb_maps",
    "weighted_gradient_sum",
]
