"""Baseline attribution maps FAME is compared with (README, "Explaining a dataset").

CAM-family methods go through the ``grad-cam`` package (pytorch_grad_cam) with its own
per-map min-max scaling and resize to the input size; for face models their target is the cosine
similarity to a frozen reference embedding (:class:`CosineSimilarityTarget`). The floors (random,
centre Gaussian, Sobel edges) need no model. Every function returns maps (B, 1, H, W) on the
input's device.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import tqdm
from pytorch_grad_cam import FullGrad, GradCAM, GradCAMElementWise, HiResCAM, ScoreCAM, score_cam
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from .engine import check_images, normalize_maps, to_gray
from .guard import explaining
from .objectives import check_runs_once

CAM_METHODS: Dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam_elementwise": GradCAMElementWise,
    "hirescam": HiResCAM,
    "fullgrad": FullGrad,
    "scorecam": ScoreCAM,
}


class CosineSimilarityTarget:
    """grad-cam target for face models: s = cos(phi(x), phi_ref) with phi_ref frozen.

    ``dissimilar=True`` gives 1 - s instead, the regions that push the pair apart (FAME's e-).
    Called by grad-cam with one sample's embedding (D,).
    """

    def __init__(self, reference_embedding: Tensor, dissimilar: bool = False):
        if reference_embedding.dim() != 1:
            raise ValueError(
                f"reference_embedding must be one embedding (D,), got shape {tuple(reference_embedding.shape)}"
            )
        self.reference = reference_embedding.detach()
        self.dissimilar = dissimilar

    def __call__(self, embedding: Tensor) -> Tensor:
        if embedding.shape != self.reference.shape:
            raise ValueError(
                f"the model's embedding {tuple(embedding.shape)} differs in shape from the reference "
                f"{tuple(self.reference.shape)}"
            )
        # Normalized here, under the caller's grad mode, so a reference made in inference mode works.
        reference = F.normalize(self.reference.to(embedding.device), dim=0)
        similarity = (F.normalize(embedding, dim=0) * reference).sum()
        return 1.0 - similarity if self.dissimilar else similarity


@contextmanager
def _without_progress_bars():
    """grad-cam's Score-CAM draws a tqdm bar per image; over a dataset that floods the log around
    the explain stage's own progress bar, so its bars are switched off while it runs."""
    library_tqdm = score_cam.tqdm
    score_cam.tqdm = SimpleNamespace(tqdm=partial(tqdm.tqdm, disable=True))
    try:
        yield
    finally:
        score_cam.tqdm = library_tqdm


def cam_maps(
    model: nn.Module,
    layer: Optional[nn.Module],
    images: Tensor,
    targets: Union[Tensor, Sequence[int], Sequence[Callable[[Tensor], Tensor]]],
    method: str = "gradcam",
    batch_size: int = 32,
) -> Tensor:
    """Grad-CAM, Grad-CAM element-wise, HiResCAM, FullGrad or Score-CAM maps through pytorch_grad_cam.

    ``targets`` are class indices, or grad-cam target callables (one per sample, e.g. a
    :class:`CosineSimilarityTarget` for face models). ``batch_size`` is the number of masked
    images per forward pass of Score-CAM (one per channel of the layer). FullGrad reads every
    convolution and batch-norm bias instead of one layer and takes ``layer=None``. A layer that one
    forward pass runs more than once is refused (``check_runs_once``). Works under
    inference mode and leaves the model as found (hooks released, flags and gradients restored).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    check_images(images)
    if layer is None and method != "fullgrad":
        raise ValueError(f"{method} needs the target layer (e.g. fame.models.target_layer(model))")
    if isinstance(targets, Tensor):
        targets = targets.tolist()
    targets = list(targets)
    if len(targets) != images.shape[0]:
        raise ValueError(f"targets must hold one entry per image ({images.shape[0]}), got {len(targets)}")
    targets = [ClassifierOutputTarget(int(t)) if not callable(t) else t for t in targets]
    if layer is not None:
        check_runs_once(model, layer, images)
    with explaining(model):
        # The graph must reach the target layer through the input, since parameters are frozen.
        inputs = images.detach().clone().requires_grad_(True)
        layers = [] if method == "fullgrad" else [layer]
        with CAM_METHODS[method](model=model, target_layers=layers) as cam, _without_progress_bars():
            cam.batch_size = int(batch_size)
            maps = cam(input_tensor=inputs, targets=targets)
    return torch.from_numpy(maps).unsqueeze(1).to(device=images.device, dtype=images.dtype)


def sample_seed(sample_id: str, seed: int = 0) -> int:
    """A 32-bit seed for one sample: zlib.crc32 of "<seed>:<id>", stable across runs, processes and
    machines (Python's hash() is salted per process; torch's CPU generator keeps 32 bits)."""
    return zlib.crc32(f"{int(seed)}:{sample_id}".encode())


def random_maps(images: Tensor, ids: Sequence[str], seed: int = 0) -> Tensor:
    """Uniform noise in [0, 1], drawn per sample from ``sample_seed(id, seed)``: the floor any
    method must beat. A map depends only on its sample's id and the seed, never on the batch it
    came in or on a resume."""
    check_images(images)
    batch, _, height, width = images.shape
    ids = list(ids)
    if len(ids) != batch:
        raise ValueError(f"ids must hold one sample id per image ({batch}), got {len(ids)}")
    maps = [
        torch.rand(1, height, width, generator=torch.Generator().manual_seed(sample_seed(sample_id, seed)))
        for sample_id in ids
    ]
    return torch.stack(maps).to(images.device, images.dtype)


def centre_gaussian_maps(images: Tensor, sigma_fraction: float = 0.25) -> Tensor:
    """A Gaussian bump at the image centre (sigma = fraction of the shorter side): the centre-bias floor."""
    check_images(images)
    batch, _, height, width = images.shape
    rows = torch.arange(height, device=images.device, dtype=images.dtype) - (height - 1) / 2
    cols = torch.arange(width, device=images.device, dtype=images.dtype) - (width - 1) / 2
    sigma = sigma_fraction * min(height, width)
    bump = torch.exp(-(rows[:, None] ** 2 + cols[None, :] ** 2) / (2 * sigma**2))
    return normalize_maps(bump.expand(batch, 1, height, width).clone(), "minmax")


def sobel_maps(images: Tensor) -> Tensor:
    """Gradient magnitude of the luma (Sobel, replicate padding), min-max normalized: the edge floor."""
    check_images(images)
    gray = to_gray(images)
    kernel_x = torch.tensor(
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device, dtype=images.dtype
    )
    kernels = torch.stack([kernel_x, kernel_x.t()]).unsqueeze(1)
    gradients = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return normalize_maps(gradients.pow(2).sum(dim=1, keepdim=True).sqrt(), "minmax")


__all__: List[str] = [
    "CAM_METHODS",
    "CosineSimilarityTarget",
    "cam_maps",
    "centre_gaussian_maps",
    "random_maps",
    "sample_seed",
    "sobel_maps",
]
