"""The FAME engine: LOTS-style perturbation of the input, read as an attribution map.

Zhang & Günther, "FAME: Feature Activation Map Explanation", CVPR Workshops 2026, built on the
LOTS procedure of Rozsa, Günther & Boult (IJCB 2017). Given a per-sample loss ``L(x) -> (B,)``:

    x_0 = x
    x_{t+1} = x_t - eta * g_t / max|g_t|          g_t = dL/dx at x_t, max per sample
    a sample stops once L(x_t) < epsilon (when set), once its stopping rule fires (``stop``:
    "flip", "settled") or after T iterations
    map = normalize(blur(|gray(x_T) - gray(x)| / max|gray(x_T) - gray(x)|))

docs/method.md gives the details (#update-rule, #stopping, #map) and the defaults (#defaults).
Everything here is a pure function of tensors: no Lightning, no I/O.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from .guard import explaining
from .precision import (
    LossScale,
    check_finite_images,
    check_precision,
    describe_samples,
    engine_arithmetic,
    forward_autocast,
    maybe_channels_last,
    nonfinite_samples,
)

#: ITU-R 601 luma weights, the ones torchvision's ``rgb_to_grayscale`` uses.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)
#: Added to the min-max (or max) denominator so an empty map stays zero instead of NaN.
NORMALIZATION_EPS = 1e-8
NORMALIZATIONS = ("minmax", "max", "none")
#: ``FameConfig.stop``: all T steps (the paper's), ``stop_after`` steps after the explained decision
#: flips, or once the map has settled (docs/method.md#stopping).
STOPPING_RULES = ("fixed", "flip", "settled")


#: ``FameConfig.epsilon``'s default: the stopping threshold of the task being explained.
TASK_DEFAULT = "task"
#: The paper's epsilon per task (the FAME paper): None runs all T steps.
TASK_EPSILONS = {"classification": None, "feature_map": None, "verification": 0.01, "custom": None}


@dataclass(frozen=True)
class FameConfig:
    """Settings of one FAME run; the defaults are the paper's (docs/method.md#defaults).

    step_size:      eta, the largest change of any pixel in one iteration (1/255); finite, > 0.
    iterations:     T, the most gradient steps a sample takes (500).
    epsilon:        stop a sample once its loss falls below this. The default, ``"task"``, means
                    the paper's value for the task being explained: None (all T steps) for
                    classification, feature maps and custom objectives, 0.01 for verification;
                    it survives any other change (``FameConfig(blur_kernel=15)`` handed to
                    ``explain_verification`` still stops at 0.01). An explicit ``None`` always
                    runs all T steps; a number always stops below that number.
    blur_kernel:    Gaussian kernel size (49, sized for 224 px); None skips the blur. An even
                    size is bumped to the next odd one.
    blur_sigma:     Gaussian standard deviation (7.7).
    normalization:  "minmax" (map - min) / (max - min + 1e-8), "max" map / (max + 1e-8),
                    or "none" (the blurred map as it is).
    clamp:          (low, high) bounds applied to x_t after each step; None leaves x_t free.
    precision:      arithmetic of the model's forward pass: "32" (float32, TF32 off: the exact
                    reference), "tf32", "bf16-mixed" or "16-mixed" (autocast; x_t, the gradient
                    normalisation, the step and the map stay float32). See ``fame.explain.precision``.
                    Inside a Lightning ``Trainer(precision=...)`` this setting wins: the
                    trainer's autocast is switched off within the engine and this one applied.
    channels_last:  run the model in channels-last memory format (faster convolutions on tensor
                    cores); the explain functions convert a copy of the model's 4-D weights for
                    the run and give the model back exactly as it was.
    stop:           the stopping rule (docs/method.md#stopping): "fixed" runs T steps (the paper's);
                    "flip" stops a sample ``stop_after`` steps after the explained decision flips
                    (the class o is no longer the top class; a verification similarity crosses the
                    pair's threshold), which needs an objective with ``loss_and_margin``; "settled"
                    stops a sample at step t (a multiple of ``settle_every``) once the rank
                    correlation of its low-resolution map at x_t with the one at x_{t - k} is above
                    ``settle_tolerance``. T stays the most steps a sample takes; epsilon still applies.
    stop_after:     steps taken after the flip (0: stop at the first x_t whose decision flipped).
    settle_every:   k, the steps between two comparisons of the settled rule.
    settle_tolerance: the rank correlation (Spearman) above which a map counts as settled, in [-1, 1).
    settle_size:    side of the low-resolution map the settled rule compares (area-averaged).
    compile:        ``torch.compile`` the forward pass and its input gradient (backward compiled
                    by AOTAutograd). The active batch is padded to the next power of two so that
                    early stopping compiles a handful of sizes, not one per step. Costs a compile
                    per model, image size and batch bucket (tens of seconds): pays off for long
                    runs on a GPU, not for short ones on a CPU.
    """

    step_size: float = 1.0 / 255.0
    iterations: int = 500
    epsilon: Union[float, None, str] = TASK_DEFAULT
    blur_kernel: Optional[int] = 49
    blur_sigma: float = 7.7
    normalization: str = "minmax"
    clamp: Optional[Tuple[float, float]] = None
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    stop: str = "fixed"
    stop_after: int = 10
    settle_every: int = 10
    settle_tolerance: float = 0.95
    settle_size: int = 16

    def __post_init__(self) -> None:
        if (
            isinstance(self.step_size, bool)
            or not isinstance(self.step_size, numbers.Real)
            or not math.isfinite(self.step_size)
            or not self.step_size > 0
        ):
            raise ValueError(f"FameConfig.step_size must be a finite number > 0, got {self.step_size!r}")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"FameConfig.iterations must be a non-negative integer, got {self.iterations}")
        if isinstance(self.epsilon, str):
            if self.epsilon != TASK_DEFAULT:
                raise ValueError(
                    f"FameConfig.epsilon must be a number, None (all T steps) or {TASK_DEFAULT!r} "
                    f"(the task's default), got {self.epsilon!r}"
                )
        elif self.epsilon is not None and (
            isinstance(self.epsilon, bool) or not isinstance(self.epsilon, numbers.Real) or math.isnan(self.epsilon)
        ):
            raise ValueError(f"FameConfig.epsilon must be a number, None or {TASK_DEFAULT!r}, got {self.epsilon!r}")
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
        object.__setattr__(self, "precision", check_precision(self.precision))
        self._check_stopping()
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"FameConfig.{name} must be True or False, got {getattr(self, name)!r}")

    def _check_stopping(self) -> None:
        if self.stop not in STOPPING_RULES:
            raise ValueError(
                f"unknown FameConfig.stop {self.stop!r}; choose one of {', '.join(map(repr, STOPPING_RULES))}"
            )
        for name, low in (("stop_after", 0), ("settle_every", 1), ("settle_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"FameConfig.{name} must be an integer >= {low}, got {value!r}")
        tolerance = self.settle_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not -1.0 <= tolerance < 1.0:
            raise ValueError(f"FameConfig.settle_tolerance must be a number in [-1, 1), got {tolerance!r}")

    @property
    def odd_blur_kernel(self) -> Optional[int]:
        """The kernel size actually used: an even size is bumped to the next odd number."""
        if self.blur_kernel is None:
            return None
        return int(self.blur_kernel) | 1

    def for_task(self, task: str) -> FameConfig:
        """This config with ``epsilon="task"`` replaced by the task's value (``TASK_EPSILONS``)."""
        if task not in TASK_EPSILONS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(map(repr, TASK_EPSILONS))}")
        if self.epsilon != TASK_DEFAULT:
            return self
        return replace(self, epsilon=TASK_EPSILONS[task])

    @property
    def stop_below(self) -> Optional[float]:
        """The threshold the run stops at: ``epsilon``, with ``"task"`` read as a custom objective's (None)."""
        return self.for_task("custom").epsilon

    def replace(self, **changes) -> FameConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)


@dataclass
class FameStats:
    """Per-sample record of a run: steps taken and the loss at x_0 and at x_T (all shape (B,))."""

    iterations: Tensor
    initial_loss: Tensor
    final_loss: Tensor

    def __getitem__(self, index) -> FameStats:
        """The statistics of a subset of samples (an index, slice or mask)."""
        return FameStats(self.iterations[index], self.initial_loss[index], self.final_loss[index])

    @staticmethod
    def cat(parts: list[FameStats]) -> FameStats:
        """The statistics of consecutive runs, concatenated along the sample dimension."""
        return FameStats(
            *(torch.cat([getattr(p, name) for p in parts]) for name in ("iterations", "initial_loss", "final_loss"))
        )


@dataclass
class Perturbation:
    """Result of the LOTS optimisation: x_T and the per-sample statistics."""

    perturbed: Tensor
    stats: FameStats = field(repr=False)


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate an image batch of shape (B, C, H, W) with C in {1, 3} and finite values."""
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
    check_finite_images(images, name)
    return images


def working_dtype(images: Tensor) -> torch.dtype:
    """x_t's dtype: the images' own when float32 / float64, float32 for lower precisions."""
    return images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32


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
    zero), blurred, then normalized per map; always in the images' precision (an autocast region
    around the call is switched off).
    """
    config = config or FameConfig()
    if images.shape != perturbed.shape:
        raise ValueError(f"perturbed must have the shape of images {tuple(images.shape)}, got {tuple(perturbed.shape)}")
    with torch.autocast(images.device.type, enabled=False):
        difference = (to_gray(perturbed) - to_gray(images)).abs().contiguous()
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


def batch_bucket(size: int, largest: int) -> int:
    """The padded batch size of a compiled step: the next power of two, at most ``largest``."""
    return min(1 << max(size - 1, 0).bit_length(), largest)


#: Graphs of the compiled step torch may keep at least (dynamo's ``recompile_limit``): the buckets
#: of several models, objectives and image sizes in one process (dynamo's default is 8).
COMPILED_GRAPHS_LIMIT = 64


def _recompile_limit_name() -> str:
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def compile_limits(batch: int):
    """The dynamo settings of a compiled run: room for every bucket of ``batch`` and of earlier
    runs (``COMPILED_GRAPHS_LIMIT``), and an error instead of a silent fall-back to eager once the
    limit is hit (``InputGradient`` turns it into a warning)."""
    dynamo = torch._dynamo.config
    limit = _recompile_limit_name()
    changes = {limit: max(getattr(dynamo, limit), COMPILED_GRAPHS_LIMIT, batch.bit_length() + 2)}
    if hasattr(dynamo, "fail_on_recompile_limit_hit") and not dynamo.suppress_errors:
        changes["fail_on_recompile_limit_hit"] = True
    return dynamo.patch(**changes)


def _recompile_limit_error() -> tuple:
    exception = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None)
    return (exception,) if exception is not None else ()


class InputGradient:
    """Loss and input gradient of the active samples at x_t, in the run's precision.

    The objective (model forward and loss) runs under ``forward_autocast``; the loss is cast to
    x_t's dtype, and autograd returns the input gradient in x_t's dtype. With ``compile`` the
    forward (and with it the backward, through AOTAutograd) is compiled once per batch bucket:
    the active samples are padded with copies of the first one, whose losses are left out of
    the gradient, so the real samples' gradients are unchanged. Only the padded images and
    their index are static: the sizes of the objective's own tensors (per-sample targets,
    references, a custom objective's state, all as long as the whole batch) are symbolic, so
    a call with another batch size reuses the graphs of the buckets it shares with earlier calls.
    Once dynamo's recompile limit is hit, the rest of the run is eager, with a warning.
    """

    def __init__(self, objective: ObjectiveFn, config: FameConfig, batch: int, device: torch.device, dtype):
        self.objective = objective
        self.subset = accepts_index(objective)
        self.precision = config.precision
        self.channels_last = config.channels_last
        self.device = device
        self.dtype = dtype
        self.batch = batch
        self.loss_scale = LossScale(config.precision == "16-mixed")
        self.with_margin = config.stop == "flip"
        if self.with_margin and not hasattr(objective, "loss_and_margin"):
            raise ValueError(
                "FameConfig.stop='flip' needs the explained decision's margin: an objective with "
                "loss_and_margin(images, index) -> (loss, margin), such as the classification and "
                f"verification objectives; {type(objective).__name__} has none"
            )
        #: the decision margins of the active samples at the last ``loss_and_gradient`` (stop="flip")
        self.margin: Optional[Tensor] = None
        self.compiled = torch.compile(self._forward, dynamic=True) if config.compile else None

    def _forward(self, inputs: Tensor, index: Tensor):
        with forward_autocast(self.precision, self.device):
            if self.with_margin:
                return self.objective.loss_and_margin(inputs, index)
            return self.objective(inputs, index) if self.subset else self.objective(inputs)

    def _split(self, output, inputs: Tensor, active: Tensor) -> Tensor:
        """The loss of ``output``; its margin (stop="flip") is kept in ``self.margin``."""
        if not self.with_margin:
            return self._checked(output, inputs)
        loss, margin = output
        self.margin = self._select(self._checked(margin, inputs).detach(), active)
        return self._checked(loss, inputs)

    def _inputs(self, current: Tensor, active: Tensor, all_index: Tensor, padded: bool):
        index = active if self.subset else all_index
        if padded and self.subset:
            size = batch_bucket(active.numel(), self.batch)
            index = torch.cat([active, active[:1].expand(size - active.numel())])
        inputs = current[index] if self.subset else current
        return maybe_channels_last(inputs, self.channels_last), index

    def _checked(self, loss, inputs: Tensor) -> Tensor:
        if not isinstance(loss, Tensor) or loss.dim() != 1 or loss.shape[0] != inputs.shape[0]:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"the objective must return one loss per sample, shape ({inputs.shape[0]},), got {shape}")
        return loss.to(self.dtype)

    def _select(self, values: Tensor, active: Tensor) -> Tensor:
        return values[: active.numel()] if self.subset else values[active]

    def _compiled_forward(self, inputs: Tensor, index: Tensor) -> Tensor:
        """The compiled objective on a padded bucket; eager (with a warning) past dynamo's recompile limit."""
        torch._dynamo.mark_static(inputs)
        torch._dynamo.mark_static(index)
        try:
            return self.compiled(inputs, index)
        except _recompile_limit_error():
            name = _recompile_limit_name()
            limit = getattr(torch._dynamo.config, name)
            warnings.warn(
                f"torch.compile hit dynamo's {name} ({limit} graphs of the FAME step in this process, one per "
                "model, objective, image size and batch bucket); the rest of this run is eager. Raise "
                f"torch._dynamo.config.{name} above {limit}, or call torch._dynamo.reset() between models",
                RuntimeWarning,
                stacklevel=2,
            )
            self.compiled = None
            return self._forward(inputs, index)

    def loss(self, current: Tensor, active: Tensor, all_index: Tensor) -> Tensor:
        """L(x_t) of the active samples, without a graph (eager, also when compiled)."""
        with torch.no_grad():
            inputs, index = self._inputs(current, active, all_index, padded=False)
            return self._select(self._split(self._forward(inputs, index), inputs, active), active)

    def loss_and_gradient(self, current: Tensor, active: Tensor, all_index: Tensor, step: int):
        """(L(x_t), dL/dx_t) of the active samples; "16-mixed" redoes an overflowing step with a smaller scale."""
        inputs, index = self._inputs(current, active, all_index, padded=self.compiled is not None)
        inputs = inputs.detach().requires_grad_(True)
        # step 0 runs eagerly: objectives validate their targets on the first call
        forward = self._compiled_forward if self.compiled is not None and step > 0 else self._forward
        while True:
            loss = self._select(self._split(forward(inputs, index), inputs, active), active)
            scale = self.loss_scale.scale
            (gradient,) = torch.autograd.grad(loss.sum() * scale if scale != 1.0 else loss.sum(), inputs)
            gradient = self._select(gradient, active)
            if not self.loss_scale.enabled:
                return loss.detach(), gradient
            if bool(torch.isfinite(gradient).all()) or not bool(torch.isfinite(loss).all()):
                # (a non-finite loss is no overflow of the scale: lots_perturbation reports it)
                self.loss_scale.step_done()
                return loss.detach(), gradient / scale
            if not self.loss_scale.backoff():
                bad = nonfinite_samples(gradient)
                raise FloatingPointError(
                    f"the input gradient is non-finite (NaN or Inf) for samples "
                    f"{describe_samples(active[bad])} at iteration {step} even with loss scale 1 under "
                    "precision '16-mixed'; the model overflows float16: use precision 'bf16-mixed' or '32'"
                )


def rank_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation of each row of ``first`` (B, N) with the same row of ``second``.

    Ties get their average rank; a row without variation gives NaN. Computed in float64.
    """

    def average_ranks(values: Tensor) -> Tensor:
        values = values.double().contiguous()
        ordered = values.sort(dim=1).values
        below = torch.searchsorted(ordered, values, right=False)
        up_to = torch.searchsorted(ordered, values, right=True)
        ranks = (below + up_to - 1).double() / 2.0
        return ranks - ranks.mean(dim=1, keepdim=True)

    a, b = average_ranks(first), average_ranks(second)
    return (a * b).sum(dim=1) / ((a * a).sum(dim=1) * (b * b).sum(dim=1)).sqrt()


def low_resolution_maps(images: Tensor, perturbed: Tensor, size: int) -> Tensor:
    """|gray(x_t) - gray(x)| averaged over ``size`` x ``size`` cells (the settled rule's map), (B, size * size).

    A side already at most ``size`` is kept as it is. Blur, per-map scaling and normalization are
    left out: they would not change the ranks much and cost a full-resolution pass.
    """
    difference = (to_gray(perturbed) - to_gray(images)).abs().double()
    if min(difference.shape[-2:]) > size:
        difference = F.adaptive_avg_pool2d(difference, size)
    return difference.flatten(1)


class FlipRule:
    """stop="flip": a sample leaves ``stop_after`` steps after the first x_t whose margin is < 0."""

    def __init__(self, config: FameConfig, batch: int, device: torch.device):
        self.after = int(config.stop_after)
        self.flipped_at = torch.full((batch,), -1, dtype=torch.long, device=device)

    def keep(self, step: int, active: Tensor, margin: Tensor, **_) -> Tensor:
        """Which of the active samples take the step from x_``step``."""
        flipped_at = self.flipped_at[active]
        flipped_at = torch.where((flipped_at < 0) & (margin < 0), torch.full_like(flipped_at, step), flipped_at)
        self.flipped_at[active] = flipped_at
        return (flipped_at < 0) | (step < flipped_at + self.after)


class SettledRule:
    """stop="settled": every k steps a sample's low-resolution map at x_t is compared with the one
    at x_{t-k} (zero at t = k, so never settled there); rank correlation above the tolerance stops it."""

    def __init__(self, config: FameConfig, images: Tensor):
        self.every = int(config.settle_every)
        self.tolerance = float(config.settle_tolerance)
        self.size = int(config.settle_size)
        self.images = images
        cells = low_resolution_maps(images[:1], images[:1], self.size).shape[1]
        self.previous = torch.zeros(images.shape[0], cells, dtype=torch.float64, device=images.device)

    def keep(self, step: int, active: Tensor, current: Tensor, **_) -> Optional[Tensor]:
        """Which of the active samples take the step from x_``step`` (None: all of them)."""
        if step == 0 or step % self.every:
            return None
        maps = low_resolution_maps(self.images[active], current[active], self.size)
        settled = rank_correlation(maps, self.previous[active]) > self.tolerance
        self.previous[active] = maps
        return ~settled


def stopping_rule(config: FameConfig, images: Tensor):
    """The per-sample stopping rule of ``config.stop`` (None for the paper's fixed T)."""
    if config.stop == "flip":
        return FlipRule(config, images.shape[0], images.device)
    if config.stop == "settled":
        return SettledRule(config, images)
    return None


def _raise_nonfinite_loss(bad: Tensor, initial_loss: Tensor, final_loss: Tensor, precision: str) -> None:
    hint = (
        "; float16 overflows above 65504: use precision 'bf16-mixed' or '32'"
        if precision == "16-mixed"
        else "; check the model's output and the objective for these inputs"
    )
    raise FloatingPointError(
        f"the FAME loss became non-finite (NaN or Inf) for samples {describe_samples(bad)} of the batch "
        f"(loss at x_0: {initial_loss[bad][:10].tolist()}, at the last iteration: {final_loss[bad][:10].tolist()})"
        f"{hint}"
    )


def lots_perturbation(objective: ObjectiveFn, images: Tensor, config: Optional[FameConfig] = None) -> Perturbation:
    """Run the LOTS descent x_{t+1} = x_t - eta * g_t / max|g_t| per sample.

    ``objective(images) -> (B,)`` is the loss to descend. An objective that also takes
    ``index`` (the positions of ``images`` in the original batch) lets finished samples leave the
    batch, so later iterations cost less; a plain one runs on the whole batch with finished
    samples frozen. ``config.stop`` adds a per-sample stopping rule (``FlipRule``, ``SettledRule``),
    checked at x_t before the step like epsilon. ``epsilon="task"`` reads as None here (no early
    stop); the explain functions resolve it for their task. The precision, channels-last and
    compile settings of ``config`` apply to the objective's evaluation; x_t, the step and the
    statistics stay in the images' dtype (float32 for lower-precision images). A loss that
    becomes non-finite raises a FloatingPointError naming the samples. The caller is responsible
    for leaving inference mode and for the model's state (see ``explain``).
    """
    config = config or FameConfig()
    check_images(images)
    epsilon = config.stop_below
    batch, device, dtype = images.shape[0], images.device, working_dtype(images)
    current = images.detach().to(dtype=dtype, copy=True)
    all_index = torch.arange(batch, device=device)
    active = all_index
    iterations = torch.zeros(batch, dtype=torch.long, device=device)
    initial_loss = torch.full((batch,), float("nan"), dtype=dtype, device=device)
    final_loss = torch.full((batch,), float("nan"), dtype=dtype, device=device)
    rule = stopping_rule(config, images.detach().to(dtype=dtype))

    context = ExitStack()
    context.enter_context(engine_arithmetic(config.precision, device))
    if config.compile:  # one compiled graph per batch bucket
        context.enter_context(compile_limits(batch))
    with context:
        step_function = InputGradient(objective, config, batch, device, dtype)
        for step in range(int(config.iterations) + 1):
            if active.numel() == 0:
                break
            if step == config.iterations:  # only the final loss is needed: no graph
                final_loss[active] = step_function.loss(current, active, all_index)
                if step == 0:
                    initial_loss[active] = final_loss[active]
                break
            loss, gradient = step_function.loss_and_gradient(current, active, all_index, step)
            if step == 0:
                initial_loss[active] = loss
                bad = nonfinite_samples(loss)
                if bad.numel():
                    _raise_nonfinite_loss(bad, initial_loss, initial_loss, config.precision)
            final_loss[active] = loss
            margin = step_function.margin
            if epsilon is not None:  # without early stopping: no masking, no device sync
                keep = loss >= epsilon
                active, gradient = active[keep], gradient[keep]
                margin = margin[keep] if margin is not None else None
                if active.numel() == 0:
                    break
            if rule is not None:
                keep = rule.keep(step, active, margin=margin, current=current)
                if keep is not None:
                    active, gradient = active[keep], gradient[keep]
                    if active.numel() == 0:
                        break
            peak = _per_sample_max(gradient.abs())
            peak = torch.where(peak > 0, peak, torch.ones_like(peak))
            updated = current[active] - config.step_size * (gradient / peak)
            if config.clamp is not None:
                updated = updated.clamp(*config.clamp)
            current[active] = updated.detach()
            iterations[active] += 1
    bad = nonfinite_samples(torch.cat([initial_loss.view(-1, 1), final_loss.view(-1, 1), current.flatten(1)], dim=1))
    if bad.numel():
        _raise_nonfinite_loss(bad, initial_loss, final_loss, config.precision)
    return Perturbation(current, FameStats(iterations, initial_loss, final_loss))


def perturbation_maps(objective: ObjectiveFn, inputs: Tensor, config: FameConfig, return_stats: bool = False):
    """LOTS perturbation of ``inputs`` followed by ``attribution_map``; the caller guards the model."""
    result = lots_perturbation(objective, inputs, config)
    maps = attribution_map(inputs.to(result.perturbed.dtype), result.perturbed, config)
    return (maps, result.stats) if return_stats else maps


def explain(
    model: nn.Module,
    images: Tensor,
    objective: ObjectiveFn,
    config: Optional[FameConfig] = None,
    return_stats: bool = False,
):
    """FAME maps (B, 1, H, W) in [0, 1] for any per-sample loss ``objective(images) -> (B,)``.

    The model is run in eval mode with frozen parameters and is restored exactly afterwards
    (also its memory format with ``channels_last``); the call works under
    ``torch.inference_mode()`` / ``torch.no_grad()`` and under an outer autocast, which the
    engine's own ``config.precision`` overrides. ``epsilon="task"`` means no early stop for a
    custom objective. With ``return_stats=True`` it returns ``(maps, FameStats)``.
    """
    config = (config or FameConfig()).for_task("custom")
    check_images(images)
    with explaining(model, channels_last=config.channels_last):
        return perturbation_maps(objective, images.detach().clone(), config, return_stats)
