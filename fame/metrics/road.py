"""ROAD: RemOve And Debias (Rong et al., ICML 2022), batched on the device (docs/method.md#road).

The top P % of pixels of a map are removed and imputed, and the model's target logit, class
probability and correctness are recorded per P. Two imputations:

- ``"zero"``: removed pixels set to 0 (what the FAME paper did);
- ``"linear"``: the noisy linear imputation of ROAD. Each removed pixel equals the weighted mean
  of its 8 neighbours, weights 1/6 for the 4 direct and 1/12 for the 4 diagonal ones (the ROAD
  authors' code), renormalised at the image border over the neighbours that exist; known pixels
  stay fixed. This is a sparse symmetric positive definite system over the removed pixels per
  image and channel, solved here for all images and channels at once by conjugate gradients
  preconditioned with a geometric multigrid V-cycle (one Jacobi sweep before and after each
  coarsening, bilinear transfers, a coarse pixel unknown when all its children are; images
  whose systems converged leave the batch). Then N(0, noise_std^2) noise is added to the
  removed pixels.

Solver tolerance: each (image, channel) system stops once its residual satisfies
``||b - A x||_2 <= tol * ||b||_2`` (default ``tol`` = 1e-5), typically after 8 to 20 iterations.
The tests check the result against a direct sparse solve (scipy): to 1e-8 in float64 and to
1e-4 in float32 on small images; at 224 px float32 rounding alone leaves differences of about
2e-4 in large removed regions, fifty times below the 0.01 noise. Systems stop independently, so
the result does not depend on which other images share the batch.

Differences from grad-cam's ``NoisyLinearImputer`` (``pytorch_grad_cam.metrics.road``, a copy of
the ROAD authors' code), all deliberate:

- the system is the same; it is solved iteratively on the device instead of by ``spsolve`` per
  image on the CPU, so solutions agree to the solver tolerance, not to the last bit;
- when every pixel is removed the system has no known pixel and is singular (``spsolve`` fails);
  here the imputed image is 0 (plus noise);
- grad-cam removes the pixels above a ``np.percentile`` threshold of the map (ties all on one
  side, counts can be off by one); here exactly ``round(P/100 * H*W)`` pixels are removed by a
  stable ranking of the map (``fame.metrics.faithfulness.pixel_ranks``);
- the noise comes from the ``generator`` passed in (on its device; a CPU generator gives the same
  numbers on CPU and GPU), not from the global random state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .faithfulness import _check_maps, _check_targets, pixel_counts, pixel_ranks

DIRECT_WEIGHT = 1 / 6
DIAGONAL_WEIGHT = 1 / 12
DEFAULT_PERCENTAGES = tuple(range(0, 101, 10))

_COARSEST_SIDE = 8
_SMOOTHING_STEPS = 1
_COARSEST_STEPS = 16


def _neighbour_kernel(channels: int, dtype, device) -> Tensor:
    kernel = torch.tensor(
        [
            [DIAGONAL_WEIGHT, DIRECT_WEIGHT, DIAGONAL_WEIGHT],
            [DIRECT_WEIGHT, 0.0, DIRECT_WEIGHT],
            [DIAGONAL_WEIGHT, DIRECT_WEIGHT, DIAGONAL_WEIGHT],
        ],
        dtype=dtype,
        device=device,
    )
    return kernel.expand(channels, 1, 3, 3).contiguous()


def _bilinear_kernel(channels: int, dtype, device) -> Tensor:
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=dtype, device=device)
    return torch.outer(taps, taps).expand(channels, 1, 4, 4).contiguous()


class _Level:
    """One grid of the multigrid hierarchy; masks are expanded to (B, C, H, W), channels last."""

    def __init__(self, unknown: Tensor, kernel: Tensor):
        batch, height, width = unknown.shape[0], unknown.shape[-2], unknown.shape[-1]
        channels = kernel.shape[0]
        ones = torch.ones(1, channels, height, width, dtype=unknown.dtype, device=unknown.device)
        in_image_weights = F.conv2d(ones, kernel, padding=1, groups=channels)[:, :1]

        def full(values: Tensor) -> Tensor:
            return values.expand(batch, channels, height, width).contiguous(memory_format=torch.channels_last)

        self.kernel = kernel
        self.unknown = full(unknown)  # 1 on removed pixels, 0 elsewhere
        self.diagonal = full(unknown * in_image_weights)  # sum of the in-image neighbour weights
        self.jacobi_scale = full(unknown / in_image_weights)

    def select(self, images: Tensor) -> _Level:
        chosen = object.__new__(_Level)
        chosen.kernel = self.kernel
        for name in ("unknown", "diagonal", "jacobi_scale"):
            setattr(chosen, name, _select(getattr(self, name), images))
        return chosen

    def neighbours(self, values: Tensor) -> Tensor:
        return F.conv2d(values, self.kernel, padding=1, groups=values.shape[1])

    def apply(self, values: Tensor) -> Tensor:
        """A x on the removed pixels for x zero elsewhere: D_i x_i - sum_j w_ij x_j."""
        return torch.addcmul(self.diagonal * values, self.unknown, self.neighbours(values), value=-1)

    def residual(self, values: Tensor, rhs: Tensor) -> Tensor:
        return torch.addcmul(rhs, self.diagonal, values, value=-1).addcmul_(self.unknown, self.neighbours(values))

    def smooth(self, values: Optional[Tensor], rhs: Tensor, steps: int) -> Tensor:
        """Jacobi sweeps x <- (b + N x) / D on the removed pixels, from ``values`` (None: zero).

        Jacobi is symmetric and D + W (the signless Laplacian of the 8-neighbour graph, which has
        triangles) is positive definite, so the V-cycle is a valid CG preconditioner.
        """
        if values is None:
            values, steps = self.jacobi_scale * rhs, steps - 1
        for _ in range(steps):
            values = self.jacobi_scale * (rhs + self.neighbours(values))
        return values


def _select(values: Tensor, images: Tensor) -> Tensor:
    return values.index_select(0, images).contiguous(memory_format=torch.channels_last)


def _build_levels(unknown: Tensor, channels: int) -> List[_Level]:
    levels = []
    kernel = _neighbour_kernel(channels, unknown.dtype, unknown.device)
    while True:
        levels.append(_Level(unknown, kernel))
        if min(unknown.shape[-2:]) <= _COARSEST_SIDE:
            return levels
        # a coarse pixel is unknown when all its children are: the coarse problem keeps the
        # known pixels as its boundary (far fewer CG iterations than 'any child unknown')
        unknown = -F.max_pool2d(-unknown, 2, ceil_mode=True)


def _restrict(values: Tensor, coarse: _Level, kernel: Tensor) -> Tensor:
    """Adjoint of ``_prolong``: bilinear full weighting (weights sum to 4 per coarse pixel)."""
    height, width = values.shape[-2:]
    values = F.pad(values, (0, width % 2, 0, height % 2))
    return coarse.unknown * F.conv2d(values, kernel, stride=2, padding=1, groups=values.shape[1])


def _prolong(values: Tensor, fine: _Level, kernel: Tensor) -> Tensor:
    """Bilinear interpolation to the fine grid (zero beyond the border), kept on removed pixels."""
    height, width = fine.unknown.shape[-2:]
    upsampled = F.conv_transpose2d(values, kernel, stride=2, padding=1, groups=values.shape[1])
    return fine.unknown * upsampled[..., :height, :width]


def _v_cycle(levels: List[_Level], rhs: Tensor, depth: int, kernel: Tensor) -> Tensor:
    level = levels[depth]
    if depth == len(levels) - 1:
        return level.smooth(None, rhs, _COARSEST_STEPS)
    values = level.smooth(None, rhs, _SMOOTHING_STEPS)
    coarse_rhs = _restrict(level.residual(values, rhs), levels[depth + 1], kernel)
    values = values + _prolong(_v_cycle(levels, coarse_rhs, depth + 1, kernel), level, kernel)
    return level.smooth(values, rhs, _SMOOTHING_STEPS)


def solve_linear_imputation(
    images: Tensor, removed: Tensor, tol: float = 1e-5, max_iterations: int = 500
) -> Tuple[Tensor, Tensor]:
    """Noise-free linear imputation: (imputed images, iterations per (image, channel) system).

    ``images`` (B, C, H, W); ``removed`` (B, 1, H, W) or (B, H, W), True / > 0.5 where a pixel
    is removed. Computes in float64 for float64 input and in float32 otherwise.
    """
    if removed.dim() == 3:
        removed = removed.unsqueeze(1)
    if images.dim() != 4 or removed.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ValueError(
            f"removed must have shape (B, 1, H, W) matching images {tuple(images.shape)}, got {tuple(removed.shape)}"
        )
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    channels = images.shape[1]
    known_values = images.to(dtype).contiguous(memory_format=torch.channels_last)
    unknown = (removed.to(images.device) > 0.5).to(dtype)
    levels = _build_levels(unknown, channels)
    fine = levels[0]
    transfer_kernel = _bilinear_kernel(channels, dtype, images.device)
    known_values = known_values * (1 - unknown)
    rhs = fine.unknown * fine.neighbours(known_values)
    levels = list(levels)

    def precondition(residual: Tensor) -> Tensor:
        return _v_cycle(levels, residual, 0, transfer_kernel)

    def per_system(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(dim=(2, 3), keepdim=True)

    tiny = torch.finfo(dtype).tiny
    full_solution = torch.zeros_like(rhs)
    solution = torch.zeros_like(rhs)
    residual = rhs
    threshold = tol * per_system(rhs, rhs).sqrt()
    active = per_system(residual, residual).sqrt() > threshold
    iterations = torch.zeros(active.shape, dtype=torch.long, device=images.device)
    working = torch.arange(images.shape[0], device=images.device)  # images still iterating
    preconditioned = precondition(residual)
    direction = preconditioned
    residual_dot = per_system(residual, preconditioned)
    for _ in range(max_iterations + 1):
        still = active.flatten(1).any(dim=1)
        if not still.all():
            # images whose systems all converged leave the batch: the others iterate as before
            finished = (~still).nonzero().squeeze(1)
            full_solution.index_copy_(0, working.index_select(0, finished), solution.index_select(0, finished))
            keep = still.nonzero().squeeze(1)
            working = working.index_select(0, keep)
            solution, residual, direction = (_select(t, keep) for t in (solution, residual, direction))
            residual_dot, threshold, active = (t.index_select(0, keep) for t in (residual_dot, threshold, active))
            levels = [level.select(keep) for level in levels]
            fine = levels[0]
        if working.numel() == 0 or _ == max_iterations:
            break
        product = fine.apply(direction)
        curvature = per_system(direction, product)
        step = torch.where(active & (curvature > 0), residual_dot / curvature.clamp(min=tiny), 0)
        solution = solution.addcmul_(step, direction)
        residual = residual.addcmul(step, product, value=-1)
        iterations.index_add_(0, working, active.long())
        active = active & (per_system(residual, residual).sqrt() > threshold)
        preconditioned = precondition(residual)
        new_residual_dot = per_system(residual, preconditioned)
        momentum = torch.where(active, new_residual_dot / residual_dot.clamp(min=tiny), 0)
        direction = preconditioned.addcmul_(momentum, direction)
        residual_dot = new_residual_dot
    if working.numel():
        full_solution.index_copy_(0, working, solution)
        warnings.warn(
            f"linear imputation: {int(active.sum())} systems did not reach the relative residual {tol} "
            f"in {max_iterations} iterations; raise max_iterations or tol",
            stacklevel=2,
        )
    solution = full_solution
    imputed = known_values + solution
    return imputed.to(images.dtype).contiguous(), iterations.view(images.shape[0], channels)


def noisy_linear_impute(
    images: Tensor,
    removed: Tensor,
    noise_std: float = 0.01,
    generator: Optional[torch.Generator] = None,
    tol: float = 1e-5,
    max_iterations: int = 500,
) -> Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels (B, 1, H, W) of ``images`` (B, C, H, W).

    Noise N(0, noise_std^2) is drawn with ``generator`` (default: torch's global generator) on
    the generator's device, one value per pixel and channel of the batch in raster order, and
    added on removed pixels only. See the module docstring for the solver and its tolerance.
    """
    imputed, _ = solve_linear_imputation(images, removed, tol=tol, max_iterations=max_iterations)
    if noise_std == 0:
        return imputed
    noise = _draw_noise(images.shape, generator, images.dtype).to(images.device)
    if removed.dim() == 3:
        removed = removed.unsqueeze(1)
    return torch.where(removed.to(images.device) > 0.5, imputed + noise_std * noise, imputed)


def _draw_noise(shape, generator: Optional[torch.Generator], dtype) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _keyed_noise(noise_seeds: Tensor, percentage: float, shape, dtype) -> Tensor:
    """N(0, 1) noise (B, C, H, W) drawn per sample on the CPU from ``(noise_seeds[b], percentage)``."""
    level = int(round(float(percentage) * 1000))
    draws = []
    for seed in noise_seeds.tolist():
        generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + level) % (2**63))
        draws.append(torch.randn(tuple(shape[1:]), generator=generator, dtype=dtype))
    return torch.stack(draws)


@dataclass
class RoadCurves:
    """Per-sample ROAD curves (B, P) at ``percentages`` (P,) of removed pixels."""

    percentages: Tensor
    logit: Tensor  # target logit
    probability: Tensor  # softmax probability of the target
    correct: Tensor  # 1.0 where the target is the arg-max class (first maximum)

    @property
    def logit_drop(self) -> Tensor:
        """Target logit at P = 0 minus the target logit at P (the FAME paper's ROAD-Delete)."""
        if float(self.percentages[0]) != 0:
            raise ValueError(
                f"the logit drop is measured from P = 0, but the curves start at P = {float(self.percentages[0]):g}; "
                "include 0 as the first percentage"
            )
        return self.logit[:, :1] - self.logit


def road_curve(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    percentages: Union[Sequence[float], Tensor] = DEFAULT_PERCENTAGES,
    most_relevant_first: bool = True,
    imputation: str = "linear",
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
    noise_std: float = 0.01,
    tol: float = 1e-5,
    noise_seeds: Optional[Tensor] = None,
) -> RoadCurves:
    """ROAD curves of ``model`` on ``images`` (B, C, H, W) with ``maps`` (B, 1, H, W).

    At each percentage P the first ``round(P/100 * H*W)`` pixels in map order (most or least
    relevant first, ties in raster order) are removed and imputed ("linear": ROAD's noisy linear
    imputation; "zero": set to 0). ``batch_size`` (default B) bounds the images imputed and passed
    through the model at once. The noise is drawn per percentage for the whole batch from
    ``generator``, so results do not depend on ``batch_size``; with ``noise_seeds`` (B,) integers
    instead, each sample's noise at P is drawn on the CPU from (its seed, P) alone, so a sample's
    curve does not depend on the other samples of the call either (what the evaluate stage uses,
    with seeds derived from the sample ids). ``targets`` (B,) are class indices. Pass the model in
    eval mode.
    """
    if imputation not in ("linear", "zero"):
        raise ValueError(f"imputation must be 'linear' or 'zero', got {imputation!r}")
    maps = _check_maps(images, maps)
    targets = _check_targets(targets, images.shape[0])
    if noise_seeds is not None:
        if generator is not None:
            raise ValueError("pass either a generator or noise_seeds for the imputation noise, not both")
        noise_seeds = torch.as_tensor(noise_seeds).view(-1)
        if noise_seeds.numel() != images.shape[0] or noise_seeds.is_floating_point():
            raise ValueError(
                f"noise_seeds must hold one integer per image, shape ({images.shape[0]},), "
                f"got {tuple(noise_seeds.shape)}"
            )
    fractions = torch.as_tensor(percentages, dtype=torch.float64).view(-1)
    if fractions.numel() == 0:
        raise ValueError("percentages is empty: pass at least one removal percentage in [0, 100]")
    fractions = fractions / 100
    ranks = pixel_ranks(maps, most_relevant_first)
    counts = pixel_counts(fractions, ranks[0].numel(), images.device)
    num_samples = images.shape[0]
    chunk = num_samples if batch_size is None else int(batch_size)
    if chunk < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    targets = targets.to(images.device)
    logits = []
    with torch.no_grad():
        for fraction, count in zip(fractions.tolist(), counts):
            noise = None
            if imputation == "linear" and noise_std != 0 and count > 0:
                noise = (
                    _keyed_noise(noise_seeds, 100 * fraction, images.shape, images.dtype)
                    if noise_seeds is not None
                    else _draw_noise(images.shape, generator, images.dtype)
                )
                noise = noise_std * noise.to(images.device)
            level = []
            for start in range(0, num_samples, chunk):
                part = slice(start, start + chunk)
                removed = ranks[part] < count
                if count == 0:
                    perturbed = images[part]
                elif imputation == "zero":
                    perturbed = torch.where(
                        removed, torch.zeros((), dtype=images.dtype, device=images.device), images[part]
                    )
                else:
                    perturbed, _ = solve_linear_imputation(images[part], removed, tol=tol)
                    if noise is not None:
                        perturbed = torch.where(removed, perturbed + noise[part], perturbed)
                level.append(model(perturbed).float())
            logits.append(torch.cat(level))
    logits = torch.stack(logits, dim=1)  # (B, P, classes)
    index = targets.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    return RoadCurves(
        percentages=torch.as_tensor(percentages, dtype=torch.float32),
        logit=logits.gather(2, index).squeeze(2),
        probability=logits.softmax(dim=2).gather(2, index).squeeze(2),
        correct=(logits.argmax(dim=2) == targets.view(-1, 1)).float(),
    )
