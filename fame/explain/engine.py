"""The FAME engine: LOTS-style perturbation of the input, read as an attribution map.

Zhang & Günther, "FAME: Feature Activation Map Explanation", CVPR Workshops 2026, built on the
LOTS procedure of Rozsa, Günther & Boult (IJCB 2017). Given a per-sample loss ``L(x) -> (B,)``:

    x_0 = x
    x_{t+1} = x_t - eta * g_t / max|g_t|          g_t = dL/dx at x_t, max per sample
    a sample stops once L(x_t) < epsilon (when set) or after T iterations
    map = normalize(blur(|gray(x_T) - gray(x)| / max|gray(x_T) - gray(x)|))

Everything here is a pure function of tensors: no Lightning, no I/O.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from .guard import explaining

#: ITU-R 601 luma weights, the ones torchvision's ``rgb_to_grayscale`` uses.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
#: Added to the min-max (or max) denominator so an empty map stays zero instead of NaN.
NORMALIZATION_EPS = 1e-8
NORMALIZATIONS = ("minmax", "max", "none")


@dataclass(frozen=True)
class FameConfig:
    """Settings of one FAME run; the defaults are the paper's.

    step_size:      eta, the largest change of any pixel in one iteration (1/255).
    iterations:     T, the most gradient steps a sample takes (500).
    epsilon:        stop a sample once its loss falls below this; None runs all T steps.
                    The paper uses None for classification and 0.01 for verification.
    blur_kernel:    Gaussian kernel size (49, sized for 224 px); None skips the blur. An even
                    size is bumped to the next odd one.
    blur_sigma:     Gaussian standard deviation (7.7).
    normalization:  "minmax" (map - min) / (max - min + 1e-8), "max" map / (max + 1e-8),
                    or "none" (the blurred map as it is).
    clamp:          (low, high) bounds applied to x_t after each step; None leaves x_t free.
    """

    step_size: float = 1.0 / 255.0
    iterations: int = 500
    epsilon: Optional[float] = None
    blur_kernel: Optional[int] = 49
    blur_sigma: float = 7.7
    normalization: str = "minmax"
    clamp: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        if not self.step_size > 0:
            raise ValueError(f"FameConfig.step_size must be > 0, got {self.step_size}")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"FameConfig.iterations must be a non-negative integer, got {self.iterations}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown FameConfig.normalization {self.normalization!r}; "
                f"choose one of {', '.join(map(repr, NORMALIZATIONS))}"
            )
        if self.blur_kernel is not None:
            if int(self.blur_kernel) != self.blur_kernel or self.blur_kernel < 1:
                raise ValueError(f"FameConfig.blur_kernel must be a positive integer or None, got {self.blur_kernel}")
            if not self.blur_sigma > 0:
                raise ValueError(f"FameConfig.blur_sigma must be > 0, got {self.blur_sigma}")
        if self.clamp is not None:
            low, high = self.clamp
            if not low < high:
                raise ValueError(f"FameConfig.clamp must be (low, high) with low < high, got {self.clamp}")
            object.__setattr__(self, "clamp", (float(low), float(high)))

    @property
    def odd_blur_kernel(self) -> Optional[int]:
        """The kernel size actually used: an even size is bumped to the next odd number."""
        if self.blur_kernel is None:
            return None
        return int(self.blur_kernel) | 1

    def replace(self, **changes) -> "FameConfig":
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass
class FameStats:
    """Per-sample record of a run: steps taken and the loss at x_0 and at x_T (all shape (B,))."""

    iterations: Tensor
    initial_loss: Tensor
    final_loss: Tensor

    def __getitem__(self, index) -> "FameStats":
        """The statistics of a subset of samples (an index, slice or mask)."""
        return FameStats(self.iterations[index], self.initial_loss[index], self.final_loss[index])

    @staticmethod
    def cat(parts: "list[FameStats]") -> "FameStats":
        """The statistics of consecutive runs, concatenated along the sample dimension."""
        return FameStats(*(torch.cat([getattr(p, name) for p in parts]) for name in ("iterations", "initial_loss", "final_loss")))


@dataclass
class Perturbation:
    """Result of the LOTS optimisation: x_T and the per-sample statistics."""

    perturbed: Tensor
    stats: FameStats = field(repr=False)


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate an image batch of shape (B, C, H, W) with C in {1, 3}."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name} must have shape (B, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0) for a single image"
        )
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must have 1 (gray) or 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}; "
            "channels-last images need images.permute(0, 3, 1, 2)"
        )
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {images.dtype}")
    return images


def to_gray(images: Tensor) -> Tensor:
    """Luma of each image (B, 3, H, W) -> (B, 1, H, W); a single channel is returned as is."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample_max(values: Tensor) -> Tensor:
    return values.flatten(1).amax(dim=1).view(-1, *([1] * (values.dim() - 1)))


def normalize_maps(maps: Tensor, mode: str) -> Tensor:
    """Per-map normalization: "minmax", "max" (both with 1e-8 in the denominator) or "none"."""
    if mode == "minmax":
        low = maps.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
        return (maps - low) / (_per_sample_max(maps) - low + NORMALIZATION_EPS)
    if mode == "max":
        return maps / (_per_sample_max(maps) + NORMALIZATION_EPS)
    if mode == "none":
        return maps
    raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(map(repr, NORMALIZATIONS))}")


def blur_maps(maps: Tensor, kernel: Optional[int], sigma: float) -> Tensor:
    """torchvision's Gaussian blur (reflect padding); an even kernel is bumped to the next odd size."""
    if kernel is None:
        return maps
    kernel = int(kernel) | 1
    height, width = maps.shape[-2:]
    if kernel // 2 >= min(height, width):
        raise ValueError(
            f"blur kernel {kernel} is too large for {height}x{width} maps (reflect padding needs "
            f"kernel // 2 < {min(height, width)}); scale FameConfig.blur_kernel and blur_sigma to the "
            "image size (the paper's 49 / 7.7 are for 224 px) or set blur_kernel=None"
        )
    return TF.gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[float(sigma), float(sigma)])


def attribution_map(images: Tensor, perturbed: Tensor, config: Optional[FameConfig] = None) -> Tensor:
    """Turn a perturbation into FAME maps (B, 1, H, W).

    |gray(x_T) - gray(x)| is divided by its per-map maximum (a map without perturbation stays
    zero), blurred, then normalized per map.
    """
    config = config or FameConfig()
    if images.shape != perturbed.shape:
        raise ValueError(
            f"perturbed must have the shape of images {tuple(images.shape)}, got {tuple(perturbed.shape)}"
        )
    difference = (to_gray(perturbed) - to_gray(images)).abs()
    peak = _per_sample_max(difference)
    difference = difference / torch.where(peak > 0, peak, torch.ones_like(peak))
    blurred = blur_maps(difference, config.odd_blur_kernel, config.blur_sigma)
    return normalize_maps(blurred, config.normalization)


ObjectiveFn = Callable[..., Tensor]


def accepts_index(objective: ObjectiveFn) -> bool:
    """True when the objective can be evaluated on a subset: ``objective(images, index)``."""
    if getattr(objective, "accepts_index", False):
        return True
    try:
        parameters = inspect.signature(objective).parameters
    except (TypeError, ValueError):
        return False
    return "index" in parameters


def _evaluate(objective: ObjectiveFn, images: Tensor, index: Tensor, subset: bool) -> Tensor:
    loss = objective(images, index) if subset else objective(images)
    if not isinstance(loss, Tensor) or loss.dim() != 1 or loss.shape[0] != images.shape[0]:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"the objective must return one loss per sample, shape ({images.shape[0]},), got {shape}"
        )
    return loss


def lots_perturbation(objective: ObjectiveFn, images: Tensor, config: Optional[FameConfig] = None) -> Perturbation:
    """Run the LOTS descent x_{t+1} = x_t - eta * g_t / max|g_t| per sample.

    ``objective(images) -> (B,)`` is the loss to descend. An objective that also takes
    ``index`` (the positions of ``images`` in the original batch) lets finished samples leave the
    batch, so later iterations cost less; a plain one runs on the whole batch with finished
    samples frozen. The caller is responsible for leaving inference mode (see ``explain``).
    """
    config = config or FameConfig()
    check_images(images)
    subset = accepts_index(objective)
    batch = images.shape[0]
    device = images.device
    current = images.detach().clone()
    all_index = torch.arange(batch, device=device)
    active = all_index
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    initial_loss = torch.full((batch,), float("nan"), dtype=images.dtype, device=device)
    final_loss = torch.full((batch,), float("nan"), dtype=images.dtype, device=device)

    for step in range(int(config.iterations) + 1):
        if active.numel() == 0:
            break
        last = step == config.iterations  # only the final loss is needed: no graph
        with torch.set_grad_enabled(not last):
            inputs = (current[active] if subset else current).detach().requires_grad_(not last)
            loss_all = _evaluate(objective, inputs, active if subset else all_index, subset)
        loss = loss_all if subset else loss_all[active]
        detached = loss.detach()
        if step == 0:
            initial_loss[active] = detached.to(initial_loss.dtype)
        final_loss[active] = detached.to(final_loss.dtype)
        if last:
            break
        if config.epsilon is None:  # nobody stops early: no masking, no device sync
            keep, moving = None, active
        else:
            keep = detached >= config.epsilon
            moving = active[keep]
            if moving.numel() == 0:
                break
        (gradient,) = torch.autograd.grad((loss if keep is None else loss[keep]).sum(), inputs)
        gradient = gradient if subset else gradient[active]
        gradient = gradient if keep is None else gradient[keep]
        peak = _per_sample_max(gradient.abs())
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        updated = current[moving] - config.step_size * (gradient / peak)
        if config.clamp is not None:
            updated = updated.clamp(*config.clamp)
        current[moving] = updated.detach()
        iterations[moving] += 1
        active = moving
    return Perturbation(current, FameStats(iterations, initial_loss, final_loss))


def perturbation_maps(objective: ObjectiveFn, inputs: Tensor, config: FameConfig, return_stats: bool = False):
    """LOTS perturbation of ``inputs`` followed by ``attribution_map``; the caller guards the model."""
    result = lots_perturbation(objective, inputs, config)
    maps = attribution_map(inputs, result.perturbed, config)
    return (maps, result.stats) if return_stats else maps


def explain(
    model: nn.Module,
    images: Tensor,
    objective: ObjectiveFn,
    config: Optional[FameConfig] = None,
    return_stats: bool = False,
):
    """FAME maps (B, 1, H, W) in [0, 1] for any per-sample loss ``objective(images) -> (B,)``.

    The model is run in eval mode with frozen parameters and is restored exactly afterwards;
    the call works under ``torch.inference_mode()`` / ``torch.no_grad()``. With
    ``return_stats=True`` it returns ``(maps, FameStats)``.
    """
    config = config or FameConfig()
    check_images(images)
    with explaining(model):
        return perturbation_maps(objective, images.detach().clone(), config, return_stats)
