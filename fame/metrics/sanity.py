"""Model-randomisation sanity check (Adebayo et al., NeurIPS 2018), docs/method.md#sanity-check.

The layers of a copy of the model are randomized one after the other, from the output down
("cascading randomization"); after each step the maps are recomputed and compared with the
maps of the intact model by Spearman rank correlation and SSIM. A map that reflects what the
model computes must change as its layers lose their learned weights; a map that stays similar is
an edge detector, not an explanation.

A cascade step names a module: a leaf layer (``parameterized_layers``, e.g. ``"layer4.1.conv2"``)
or a whole block (``layer_blocks``, e.g. ResNet's ``fc, layer4, layer3, layer2, layer1, bn1,
conv1`` as in the paper); a step randomizes every parameter in the named module's subtree, in
one of two ways (``RANDOMIZATIONS``):

- "reinit" (default): re-initialisation, as Adebayo et al. and Quantus do: every module of the
  subtree that has ``reset_parameters()`` draws its parameters afresh from its own initialiser, and
  BatchNorm running statistics are reset (``reset_running_stats()``: mean 0, variance 1).
  Parameters of a module without ``reset_parameters()`` stay as they are (as in Quantus).
- "redraw": every parameter redrawn from a Gaussian with its own mean and std; running statistics
  kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor, nn

#: Ways of randomizing a cascade step (module docstring).
RANDOMIZATIONS = ("reinit", "redraw")
#: Score names of the cascade (Spearman, SSIM) per randomization: re-initialisation keeps the plain
#: names, the redraw is named, so scores name their protocol.
RANDOMIZATION_METRICS = {
    "reinit": ("sanity_spearman", "sanity_ssim"),
    "redraw": ("sanity_redraw_spearman", "sanity_redraw_ssim"),
}


@dataclass
class RandomizationResult:
    """Scores per cascading step (L, B): step l has the layers ``layers[: l + 1]`` randomized."""

    layers: List[str]
    # rank correlation with the intact model's maps (0 where only the new map is constant, NaN where the intact one is)
    spearman: Tensor
    ssim: Tensor  # structural similarity with the intact model's maps (data range 1)


def parameterized_layers(model: nn.Module) -> List[str]:
    """Names of the modules holding parameters of their own, output side first.

    The order is the reverse of registration order (``named_modules``), which is the forward
    order for sequential networks such as torchvision's ResNets; pass ``layers`` explicitly for
    models whose submodules are registered out of order.
    """
    names = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    return names[::-1]


def layer_blocks(model: nn.Module) -> List[str]:
    """Names of the model's top-level children that hold parameters, output side first.

    The default cascade of the evaluate stage's sanity check: the blocks Adebayo et al. randomise
    (for a torchvision ResNet ``fc, layer4, layer3, layer2, layer1, bn1, conv1``), far fewer steps
    than every leaf of ``parameterized_layers``. A wrapper whose parameters all sit in one child
    and none of its own (e.g. ``fame.models.Classifier`` around its ``net``) is looked through:
    the blocks are that child's, with dotted names (``net.fc, net.layer4, ...``). The order is the
    reverse of registration order, as for ``parameterized_layers``; pass ``layers`` explicitly for
    models whose children are registered out of forward order. Parameters the model holds itself
    next to its children (e.g. a ViT's ``class_token``) belong to no block and stay intact.
    """
    prefix, module = "", model
    while True:
        children = [(name, child) for name, child in module.named_children() if holds_parameters(child)]
        if len(children) != 1 or any(True for _ in module.parameters(recurse=False)):
            break
        name, module = children[0]
        prefix += f"{name}."
    names = [f"{prefix}{name}" for name, _ in children]
    if any(True for _ in module.parameters(recurse=False)) and not names:
        names = [prefix[:-1]] if prefix else [""]
    return names[::-1]


def holds_parameters(module: nn.Module) -> bool:
    """True when the module or any submodule has parameters."""
    return any(True for _ in module.parameters())


def randomize_parameters_(module: nn.Module, generator: torch.Generator, recurse: bool = True) -> None:
    """Redraw every parameter of the module (and, with ``recurse``, of its whole subtree) from a
    Gaussian with that parameter's own original mean and std, in ``module.parameters()`` order.

    A constant parameter (std 0, e.g. freshly initialised BatchNorm weights of ones or zero
    biases) gets std max(|mean|, 0.01) so that it changes too. Buffers (running statistics) stay.
    For a leaf module ``recurse`` makes no difference.
    """
    with torch.no_grad():
        for parameter in module.parameters(recurse=recurse):
            values = parameter.detach().double()
            mean = values.mean()
            spread = values.std() if values.numel() > 1 else torch.zeros((), dtype=torch.float64)
            if not spread > 0:
                spread = mean.abs().clamp(min=0.01)
            draw = torch.randn(parameter.shape, generator=generator, dtype=torch.float64, device=generator.device)
            parameter.copy_(mean + spread * draw.to(parameter.device))


def reinitialization_seed(generator: torch.Generator) -> int:
    """The global seed one re-initialisation step runs under, drawn from ``generator``."""
    return int(torch.randint(0, 2**62, (), generator=generator))


def reinitialize_parameters_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise the module's subtree: ``reset_parameters()`` of every module that has it and
    ``reset_running_stats()`` of every module with running statistics, in ``module.modules()`` order.

    PyTorch's initialisers draw from the global generator of the parameters' device, so the step
    seeds it (the CPU one and that of each CUDA device holding parameters) with
    ``reinitialization_seed(generator)`` inside ``torch.random.fork_rng``: the same generator state
    gives the same weights on the same device, and the caller's global random state is left as it was.
    """
    seed = reinitialization_seed(generator)
    devices = sorted({p.device.index for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.random.default_generator.manual_seed(seed)
        for device in devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        for submodule in module.modules():
            if callable(getattr(submodule, "reset_parameters", None)):
                submodule.reset_parameters()
            if callable(getattr(submodule, "reset_running_stats", None)):
                submodule.reset_running_stats()


def randomize_step_(module: nn.Module, generator: torch.Generator, randomization: str = "reinit") -> None:
    """One cascade step on ``module``: :func:`reinitialize_parameters_` or :func:`randomize_parameters_`."""
    if randomization == "reinit":
        reinitialize_parameters_(module, generator)
    elif randomization == "redraw":
        randomize_parameters_(module, generator)
    else:
        raise ValueError(f"randomization must be one of {', '.join(RANDOMIZATIONS)}, got {randomization!r}")


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


def _constant(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    return (flat.amax(dim=1) == flat.amin(dim=1)).cpu()


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
    randomization: str = "reinit",
) -> RandomizationResult:
    """Spearman and SSIM of the maps after randomizing ``layers`` cumulatively, in the given order.

    ``explain_fn(model, images, targets)`` returns maps (B, 1, H, W) in [0, 1] (for a registry
    method: ``lambda m, x, t: method(m, x, t, ids=ids).maps[""]``); it is called once on the
    intact copy, then once after each step. ``layers`` are module names of ``model``: leaves or
    blocks, default ``parameterized_layers(model)`` (every leaf, output first; ``layer_blocks(model)``
    gives the paper's block cascade). Step l randomizes every parameter in the subtree of
    ``layers[l]`` (``randomization`` "reinit": :func:`reinitialize_parameters_`, "redraw":
    :func:`randomize_parameters_`), keeping the steps before it. The caller's model is never
    touched (not even its gradients): the maps of the intact model and the randomization both use
    a deep copy, with parameters drawn from ``generator``; the same generator state gives the same
    randomized networks.
    """
    if randomization not in RANDOMIZATIONS:
        raise ValueError(f"randomization must be one of {', '.join(RANDOMIZATIONS)}, got {randomization!r}")
    randomized = copy.deepcopy(model)
    modules = dict(randomized.named_modules())
    layers = list(parameterized_layers(randomized) if layers is None else layers)
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not modules of the model; pick blocks from layer_blocks(model) "
            f"{layer_blocks(randomized)} or leaves from parameterized_layers(model)"
        )
    original = explain_fn(randomized, images, targets).detach()  # the copy, still intact
    spearman, ssim = [], []
    for name in layers:
        randomize_step_(modules[name], generator, randomization)
        maps = explain_fn(randomized, images, targets).detach()
        correlation = spearman_correlation(original, maps).cpu()
        # a map that became constant (e.g. FAME takes no step on the randomized model) keeps no
        # rank order of the intact one: 0, not NaN, so the sample still counts as changed
        correlation[_constant(maps) & ~_constant(original)] = 0.0
        spearman.append(correlation)
        ssim.append(structural_similarity_batch(original, maps))
    return RandomizationResult(layers=layers, spearman=torch.stack(spearman), ssim=torch.stack(ssim))
