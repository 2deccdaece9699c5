"""Arithmetic of a FAME run: which precision the model's forward pass uses (README, "Speed").

Only the model runs in low precision. x_t, the input gradient (cast back to float32 by autograd,
since x_t is float32), the per-sample max normalisation, the step, the perturbation and the map
stay in float32: the step is 1/255 and must not be rounded away.

Precision names follow Lightning's ``Trainer(precision=...)``:

- ``"32"``: float32 throughout, TF32 off for matmuls and convolutions (the exact reference).
- ``"tf32"``: float32 tensors, TF32 tensor cores for matmuls and convolutions.
- ``"bf16-mixed"``: the forward pass under ``torch.autocast`` with bfloat16.
- ``"16-mixed"``: the forward pass under ``torch.autocast`` with float16; the loss is scaled
  before the backward pass so small input gradients do not underflow float16 (see ``LossScale``).

The engine's own setting always wins over the caller's: an autocast region that is active
around the call (as Lightning's precision plugins open around ``predict_step`` and
``validation_step``) is switched off inside the engine, and the TF32 flags are set for the run
and restored afterwards. Under ``Trainer(precision="bf16-true")`` / ``"16-true"`` the model's
weights themselves are low precision: x_t still stays float32, so run such a model with
``"bf16-mixed"`` / ``"16-mixed"`` (autocast casts x_t for the model); ``"32"`` refuses the
mismatch with PyTorch's dtype error. Such a trainer also hands ``predict_step`` the batch in
bfloat16 / float16: x_0 is then the already rounded image (x_t starts from it in float32, and
the map measures the perturbation against it), so such maps differ from those of the float32
images by more than the forward pass's rounding.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

PRECISIONS = ("32", "tf32", "bf16-mixed", "16-mixed")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def check_precision(precision: str) -> str:
    """The precision name, or a ValueError listing the valid ones."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown FAME precision {precision!r}; choose one of {', '.join(map(repr, PRECISIONS))} "
            "(Lightning's names; '16-true' / 'bf16-true' would round the 1/255 step away)"
        )
    return precision


@contextmanager
def tf32_flags(enabled: bool) -> Iterator[None]:
    """Set TF32 for float32 matmuls and cuDNN convolutions in the body; restore both afterwards."""
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled
        yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


@contextmanager
def engine_arithmetic(precision: str, device: torch.device) -> Iterator[None]:
    """The run's float32 arithmetic: any outer autocast on ``device`` off, TF32 as ``precision`` says."""
    precision = check_precision(precision)
    with torch.autocast(device.type, enabled=False), tf32_flags(precision == "tf32"):
        yield


def forward_autocast(precision: str, device: torch.device):
    """The autocast region the model's forward pass runs in (disabled for "32" and "tf32")."""
    dtype = AUTOCAST_DTYPES.get(check_precision(precision))
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


class LossScale:
    """Dynamic loss scaling for "16-mixed", in the manner of ``torch.amp.GradScaler``.

    The loss is multiplied by ``scale`` before the backward pass and the input gradient divided
    by it afterwards. A step whose gradient overflows (Inf or NaN) is redone with half the scale;
    after ``growth_interval`` clean steps the scale doubles again. The FAME step uses
    g / max|g| per sample, so the scale never changes the step, only what survives float16.
    """

    def __init__(
        self,
        enabled: bool,
        initial: float = 2.0**16,
        growth_interval: int = 100,
        smallest: float = 1.0,
        largest: float = 2.0**24,
    ):
        self.enabled = enabled
        self.scale = initial if enabled else 1.0
        self.growth_interval = growth_interval
        self.smallest = smallest
        self.largest = largest
        self._clean_steps = 0

    def backoff(self) -> bool:
        """Halve the scale after an overflow; False when it is already at its smallest."""
        if not self.enabled or self.scale <= self.smallest:
            return False
        self.scale = max(self.scale / 2.0, self.smallest)
        self._clean_steps = 0
        return True

    def step_done(self) -> None:
        """Count a clean step; grow the scale after ``growth_interval`` of them."""
        if not self.enabled:
            return
        self._clean_steps += 1
        if self._clean_steps >= self.growth_interval:
            self.scale = min(self.scale * 2.0, self.largest)
            self._clean_steps = 0


def nonfinite_samples(values: Tensor) -> Tensor:
    """Positions of the samples (dim 0) holding any NaN or Inf."""
    return (~torch.isfinite(values.reshape(values.shape[0], -1))).any(dim=1).nonzero().flatten()


def describe_samples(positions: Tensor, limit: int = 10) -> str:
    """ "[0, 3, 7]" or "[0, 3, ... ] (25 samples)" for an error message."""
    listed = positions.tolist()
    if len(listed) <= limit:
        return str(listed)
    return f"{str(listed[:limit])[:-1]}, ...] ({len(listed)} samples)"


def check_finite_images(images: Tensor, name: str = "images") -> None:
    """Raise a ValueError naming the count of NaN / Inf pixel values and the samples holding them."""
    bad = ~torch.isfinite(images)
    if bool(bad.any()):
        count = int(bad.sum())
        samples = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"{name} contain {count} non-finite pixel values (NaN or Inf) in samples "
            f"{describe_samples(samples)}; FAME needs finite inputs: fix or drop these images"
        )


def maybe_channels_last(images: Tensor, enabled: bool) -> Tensor:
    """``images`` in channels-last memory format when ``enabled`` (same values, other strides)."""
    if enabled and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def map_agreement(maps: Tensor, reference: Tensor) -> dict:
    """How far maps (B, 1, H, W) of a setting are from the reference (float32) maps of the same
    images: per-map Spearman rank correlation (ties averaged; 1 for two identical constant maps)
    and per-map max absolute difference, both as float64 tensors (B,)."""
    from scipy.stats import spearmanr

    if maps.shape != reference.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and reference {tuple(reference.shape)} must have one shape")
    flat = maps.detach().double().cpu().flatten(1).numpy()
    flat_reference = reference.detach().double().cpu().flatten(1).numpy()
    correlations = []
    for values, expected in zip(flat, flat_reference):
        if values.min() == values.max() or expected.min() == expected.max():
            correlations.append(1.0 if (values == expected).all() else 0.0)
        else:
            correlations.append(float(spearmanr(values, expected).statistic))
    difference = (maps.detach().double() - reference.detach().double()).abs().flatten(1).amax(dim=1).cpu()
    return {"spearman": torch.tensor(correlations, dtype=torch.float64), "max_abs_difference": difference}
