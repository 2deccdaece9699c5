"""The largest batch of FAME iterations a device holds (README, "Speed").

One FAME iteration is a forward pass and a backward pass to the input; its memory grows with the
batch. ``find_batch_size`` doubles the batch while it fits, then bisects between the last batch
that fit and the first that did not. What "fits" means is a function ``fits(batch) -> bool``:

- on CUDA (``trial_fits``): two FAME iterations of a random batch run in the config's precision
  and memory format; an out-of-memory error means no. The answer is what really ran, so it can
  be trusted on that device as long as nothing else takes memory meanwhile.
- on CPU (``ram_fits``): there is no out-of-memory error to catch (the kernel kills the
  process), so the bytes autograd saves per image are measured on one and two images and the
  batch must stay within half of the available RAM. CPU batches are also capped at
  ``CPU_MAX_BATCH`` (64): past it a CPU's throughput no longer rises, only its memory use.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .engine import FameConfig, explain
from .objectives import full_precision

#: The largest batch searched on a CPU (see the module docstring).
CPU_MAX_BATCH = 64
#: The largest batch searched on a GPU.
GPU_MAX_BATCH = 1024
#: Iterations run per trial batch: the second one sees the allocator in its steady state.
TRIAL_ITERATIONS = 2


def _output_sum(model: nn.Module) -> Callable[[Tensor], Tensor]:
    def objective(images: Tensor) -> Tensor:
        output = model(images)
        if isinstance(output, (tuple, list)):
            output = output[0]
        return full_precision(output).flatten(1).sum(dim=1)

    return objective


def _trial_config(config: FameConfig) -> FameConfig:
    return config.replace(iterations=TRIAL_ITERATIONS, epsilon=None, blur_kernel=None, compile=False)


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocator's out-of-memory error (CUDA's, or one reported as a RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def trial_fits(
    model: nn.Module, image_shape: Sequence[int], config: FameConfig, device: torch.device
) -> Callable[[int], bool]:
    """``fits(batch)``: do two FAME iterations of ``batch`` random images run without running out of memory?"""

    def fits(batch: int) -> bool:
        try:
            images = torch.rand((batch, *image_shape), device=device)
            explain(model, images, _output_sum(model), _trial_config(config))
            return True
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            return False
        finally:
            images = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return fits


def available_ram() -> int:
    """Bytes of RAM available to new allocations (MemAvailable of /proc/meminfo, else free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def saved_bytes(
    model: nn.Module, image_shape: Sequence[int], config: FameConfig, device: torch.device, batch: int
) -> int:
    """Bytes autograd keeps for the backward pass of one FAME iteration of ``batch`` images."""
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        explain(
            model,
            torch.rand((batch, *image_shape), device=device),
            _output_sum(model),
            _trial_config(config).replace(iterations=1),
        )
    return total


def ram_fits(
    model: nn.Module,
    image_shape: Sequence[int],
    config: FameConfig,
    device: torch.device,
    available_bytes: Optional[int] = None,
    fraction: float = 0.5,
) -> Callable[[int], bool]:
    """``fits(batch)``: does twice the saved-tensor memory of ``batch`` images (saved tensors plus
    the gradients of the backward pass) stay within ``fraction`` of the available RAM?"""
    one = saved_bytes(model, image_shape, config, device, 1)
    two = saved_bytes(model, image_shape, config, device, 2)
    per_image, fixed = max(two - one, 1), max(2 * one - two, 0)
    budget = fraction * (available_ram() if available_bytes is None else available_bytes)
    return lambda batch: fixed + 2 * batch * per_image <= budget


def find_batch_size(
    model: nn.Module,
    image_shape: Sequence[int],
    config: Optional[FameConfig] = None,
    device: Optional[torch.device | str] = None,
    start: int = 8,
    max_batch: Optional[int] = None,
    fits: Optional[Callable[[int], bool]] = None,
    images_per_sample: int = 1,
) -> int:
    """The largest batch of samples whose FAME iterations on ``image_shape`` (C, H, W) images fit
    ``device``: doubling from ``start`` samples, then bisecting.

    ``images_per_sample`` is the number of images the engine forwards per sample: 1 for
    ``explain_classification``, 2 for ``explain_verification`` (its e+ and e- modes run as one
    batch). ``fits`` and ``max_batch`` count the images of one forward pass, so a batch of B
    samples is tried as ``images_per_sample * B`` images. ``fits`` defaults to ``trial_fits`` on
    CUDA and ``ram_fits`` elsewhere (module docstring); ``max_batch`` to 1024 images on CUDA and
    ``CPU_MAX_BATCH`` elsewhere. The model is left as found. Raises a RuntimeError when not even
    one sample fits.
    """
    config = config or FameConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    image_shape = tuple(int(size) for size in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    if max_batch is None:
        max_batch = GPU_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH
    if start < 1 or images_per_sample < 1:
        raise ValueError(f"start and images_per_sample must be at least 1, got {start} and {images_per_sample}")
    if max_batch < images_per_sample:
        raise ValueError(f"max_batch must hold one sample of {images_per_sample} images, got {max_batch}")
    if fits is None:
        fits = (trial_fits if device.type == "cuda" else ram_fits)(model, image_shape, config, device)
    most_samples = max_batch // images_per_sample
    largest_fit, smallest_failure = 0, None
    samples = min(start, most_samples)
    while True:
        if fits(samples * images_per_sample):
            largest_fit = samples
            if samples >= most_samples:
                return samples
            samples = min(2 * samples, most_samples)
        else:
            smallest_failure = samples
            break
    while smallest_failure - largest_fit > 1:
        middle = (largest_fit + smallest_failure) // 2
        if fits(middle * images_per_sample):
            largest_fit = middle
        else:
            smallest_failure = middle
    if largest_fit == 0:
        raise RuntimeError(
            f"not even one sample ({images_per_sample} images of shape {image_shape}) fits a FAME iteration "
            f"on {device}; use smaller images, precision='bf16-mixed', or a device with more free memory"
        )
    return largest_fit
