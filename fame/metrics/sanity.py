"""Model-randomisation sanity check (Adebayo et al., NeurIPS 2018), DESIGN.md sec. 3.

The layers of a copy of the model are re-drawn at random one after the other, from the output
down ("cascading randomization"); after each step the maps are recomputed and compared with the
maps of the intact model by Spearman rank correlation and SSIM. A map that reflects what the
model computes must change as its layers lose their learned weights; a map that stays similar is
an edge detector, not an explanation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor, nn


@dataclass
class RandomizationResult:
    """Scores per cascading step (L, B): step l has the layers ``layers[: l + 1]`` randomized."""

    layers: List[str]
    spearman: Tensor  # rank correlation with the intact model's maps (NaN for a constant map)
    ssim: Tensor  # structural similarity with the intact model's maps (data range 1)


def parameterized_layers(model: nn.Module) -> List[str]:
    """Names of the modules holding parameters of their own, output side first.

    The order is the reverse of registration order (``named_modules``), which is the forward
    order for sequential networks such as torchvision's ResNets; pass ``layers`` explicitly for
    models whose submodules are registered out of order.
    """
    names = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    return names[::-1]


def randomize_parameters_(module: nn.Module, generator: torch.Generator) -> None:
    """Redraw each of the module's own parameters from a Gaussian with its original mean and std.

    A constant parameter (std 0, e.g. freshly initialised BatchNorm weights of ones or zero
    biases) gets std max(|mean|, 0.01) so that it changes too. Buffers (running statistics) stay.
    """
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            values = parameter.detach().double()
            mean = values.mean()
            spread = values.std() if values.numel() > 1 else torch.zeros((), dtype=torch.float64)
            if not spread > 0:
                spread = mean.abs().clamp(min=0.01)
            draw = torch.randn(parameter.shape, generator=generator, dtype=torch.float64, device=generator.device)
            parameter.copy_(mean + spread * draw.to(parameter.device))


def spearman_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation (B,) of two batches of maps (B, ...), ties given their average rank."""
    first_ranks, second_ranks = _average_ranks(first.flatten(1)), _average_ranks(second.flatten(1))
    first_ranks = first_ranks - first_ranks.mean(dim=1, keepdim=True)
    second_ranks = second_ranks - second_ranks.mean(dim=1, keepdim=True)
    covariance = (first_ranks * second_ranks).sum(dim=1)
    scale = (first_ranks.square().sum(dim=1) * second_ranks.square().sum(dim=1)).sqrt()
    return torch.where(scale > 0, covariance / scale.clamp(min=1e-300), torch.full_like(scale, float("nan"))).float()


def _average_ranks(values: Tensor) -> Tensor:
    values = values.double()
    ordered = torch.sort(values, dim=1).values.contiguous()
    below = torch.searchsorted(ordered, values.contiguous(), right=False)
    up_to = torch.searchsorted(ordered, values.contiguous(), right=True)
    return (below + up_to - 1).double() / 2


def structural_similarity_batch(first: Tensor, second: Tensor, data_range: float = 1.0) -> Tensor:
    """SSIM (B,) of two batches of maps (B, 1, H, W) with scikit-image's defaults (7 x 7 window, maps >= 7 px)."""
    first = first.detach().float().cpu().numpy().reshape(first.shape[0], *first.shape[-2:])
    second = second.detach().float().cpu().numpy().reshape(second.shape[0], *second.shape[-2:])
    scores = [structural_similarity(a, b, data_range=data_range) for a, b in zip(first, second)]
    return torch.tensor(np.asarray(scores, dtype=np.float32))


def cascading_randomization(
    model: nn.Module,
    explain_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    images: Tensor,
    targets: Tensor,
    generator: torch.Generator,
    layers: Optional[Sequence[str]] = None,
) -> RandomizationResult:
    """Spearman and SSIM of the maps after randomizing ``layers`` cumulatively, in the given order.

    ``explain_fn(model, images, targets)`` returns maps (B, 1, H, W) in [0, 1] (for a registry
    method: ``lambda m, x, t: method(m, x, t, ids=ids).maps[""]``). ``layers`` are module names
    of ``model``, default ``parameterized_layers(model)`` (output first). The caller's model is
    never touched (not even its gradients): the maps of the intact model and the randomization
    both use a deep copy, with parameters drawn from ``generator`` (see ``randomize_parameters_``).
    """
    randomized = copy.deepcopy(model)
    modules = dict(randomized.named_modules())
    layers = list(parameterized_layers(randomized) if layers is None else layers)
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(f"layers {unknown} are not modules of the model; pick from parameterized_layers(model)")
    original = explain_fn(randomized, images, targets).detach()  # the copy, still intact
    spearman, ssim = [], []
    for name in layers:
        randomize_parameters_(modules[name], generator)
        maps = explain_fn(randomized, images, targets).detach()
        spearman.append(spearman_correlation(original, maps).cpu())
        ssim.append(structural_similarity_batch(original, maps))
    return RandomizationResult(layers=layers, spearman=torch.stack(spearman), ssim=torch.stack(ssim))
