"""The losses FAME descends (the FAME paper; docs/method.md#losses).

Each objective maps a batch of images to one loss per sample and takes ``index``, the positions
of those images in the original batch, so the engine can drop finished samples.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.submodules import find_submodule, module_name
from .guard import explaining

VERIFICATION_MODES = ("similar", "dissimilar")


CLASSIFICATION_LOSSES = ("logit", "abs_logit", "log_softmax", "probability", "margin")


def full_precision(values: Tensor) -> Tensor:
    """A model output from an autocast region in float32 (float32 / float64 outputs as they are)."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def _forward_2d(model: nn.Module, images: Tensor, what: str) -> Tensor:
    output = model(images)
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != images.shape[0]:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"the model must return {what} of shape (B, D) for B = {images.shape[0]}, got {shape}")
    return full_precision(output)


def check_classification_loss(loss: str) -> str:
    """The loss variant's name, or a ValueError listing the variants."""
    if loss not in CLASSIFICATION_LOSSES:
        raise ValueError(
            f"unknown classification loss {loss!r}; choose one of {', '.join(map(repr, CLASSIFICATION_LOSSES))}"
        )
    return loss


def classification_loss(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """Per-sample loss of class o = ``targets`` from logits z (B, K):

    logit z_o (the paper's), abs_logit |z_o|, log_softmax z_o - logsumexp(z), probability
    softmax(z)_o, margin z_o - max_{j != o} z_j (below 0 once o is no longer the top class).
    """
    check_classification_loss(loss)
    chosen = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    if loss == "logit":
        return chosen
    if loss == "abs_logit":
        return chosen.abs()
    if loss == "log_softmax":
        return logits.log_softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
    if loss == "probability":
        return logits.softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
    others = logits.scatter(1, targets.view(-1, 1), float("-inf"))
    return chosen - others.amax(dim=1)


class ClassLogit:
    """Classification loss of each sample's class o (``classification_loss``; default z_o)."""

    accepts_index = True

    def __init__(self, model: nn.Module, targets: Tensor, loss: str = "logit"):
        self.model = model
        self.targets = targets
        self.loss = check_classification_loss(loss)
        self._checked = False

    def __call__(self, images: Tensor, index: Tensor) -> Tensor:
        logits = _forward_2d(self.model, images, "logits")
        self._check(logits)
        return classification_loss(logits, self.targets[index], self.loss)

    def _check(self, logits: Tensor) -> None:
        if not self._checked:
            if int(self.targets.max()) >= logits.shape[1] or int(self.targets.min()) < 0:
                raise ValueError(
                    f"targets must be class indices in [0, {logits.shape[1]}), got {self.targets.tolist()}"
                )
            if self.loss == "margin" and logits.shape[1] < 2:
                raise ValueError("the margin loss needs at least 2 classes, the model returns 1 logit")
            self._checked = True

    def loss_and_margin(self, images: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
        """The loss and the decision margin z_o - max_{j != o} z_j, below 0 once o is no longer the
        top class (``FameConfig.stop="flip"``), from one forward pass."""
        logits = _forward_2d(self.model, images, "logits")
        if logits.shape[1] < 2:
            raise ValueError("stop='flip' needs at least 2 classes to flip between, the model returns 1 logit")
        self._check(logits)
        targets = self.targets[index]
        return classification_loss(logits, targets, self.loss), classification_loss(logits, targets, "margin")


class CosineToReference:
    """Verification loss: s = cos(phi(x), phi_ref) ("similar", e+) or 1 - s ("dissimilar", e-).

    Gradients flow through the norm of phi(x); phi_ref is a frozen, L2-normalized embedding per
    sample; ``dissimilar`` is a boolean per sample choosing 1 - s. ``threshold`` (one number or
    one per sample) is the pair's verification threshold tau, needed by ``FameConfig.stop="flip"``
    only: the margin is s - tau for "similar" (below 0 once s < tau) and tau - s for "dissimilar".
    """

    accepts_index = True

    def __init__(
        self,
        model: nn.Module,
        reference_embeddings: Tensor,
        dissimilar: Tensor,
        threshold: Optional[Union[float, Tensor]] = None,
    ):
        self.model = model
        self.reference = F.normalize(reference_embeddings.detach(), dim=1)
        self.dissimilar = dissimilar
        self.threshold = None
        if threshold is not None:
            threshold = torch.as_tensor(threshold, dtype=self.reference.dtype, device=self.reference.device)
            self.threshold = threshold.expand(self.reference.shape[0]).clone()

    def similarity(self, images: Tensor, index: Tensor) -> Tensor:
        """s = cos(phi(images), phi_ref) of the samples at ``index``."""
        embeddings = _forward_2d(self.model, images, "embeddings")
        if embeddings.shape[1] != self.reference.shape[1]:
            raise ValueError(
                f"embedding size {embeddings.shape[1]} differs from the reference's {self.reference.shape[1]}"
            )
        return (F.normalize(embeddings, dim=1) * self.reference[index]).sum(dim=1)

    def __call__(self, images: Tensor, index: Tensor) -> Tensor:
        similarity = self.similarity(images, index)
        return torch.where(self.dissimilar[index], 1.0 - similarity, similarity)

    def loss_and_margin(self, images: Tensor, index: Tensor) -> Tuple[Tensor, Tensor]:
        """The loss and the margin to the pair's threshold (``FameConfig.stop="flip"``)."""
        if self.threshold is None:
            raise ValueError(
                "FameConfig.stop='flip' for verification needs the pair's threshold: "
                "explain_verification(..., threshold=tau)"
            )
        similarity = self.similarity(images, index)
        dissimilar, threshold = self.dissimilar[index], self.threshold[index]
        loss = torch.where(dissimilar, 1.0 - similarity, similarity)
        return loss, torch.where(dissimilar, threshold - similarity, similarity - threshold)


class LayerNotReached(RuntimeError):
    """The forward pass never ran the requested layer."""


class _StopForward(Exception):
    """Raised by the capture hook to skip the layers after the one being explained."""


class FeatureActivation:
    """Feature-map loss (paper Sec. 4.1): sum_c |a_c[k]| at location k = (row, col) of ``layer``.

    A forward hook captures the layer's output and stops the forward pass there, so the layers
    after it cost nothing; before the first capture one whole forward pass checks that the layer
    runs once (``check_runs_once``). Use as a context manager; the hook is removed on exit.
    """

    accepts_index = True

    def __init__(self, model: nn.Module, layer: nn.Module, locations: Tensor):
        self.model = model
        self.layer = layer
        self.locations = locations
        self._captured: Optional[Tensor] = None
        self._handle = None
        self._checked = False

    def __enter__(self) -> FeatureActivation:
        self._handle = self.layer.register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _capture(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        self._captured = output
        raise _StopForward

    def activations(self, images: Tensor) -> Tensor:
        """The layer's output (B, C, h, w) for ``images``."""
        if self._handle is None:
            raise RuntimeError("FeatureActivation must be used inside a `with` block")
        if not self._checked:
            self._handle.remove()  # the capture hook stops the forward pass; the check needs all of it
            try:
                check_runs_once(self.model, self.layer, images)
            finally:
                self._handle = self.layer.register_forward_hook(self._capture)
            self._checked = True
        self._captured = None
        try:
            self.model(images)
        except _StopForward:
            pass
        output = self._captured
        self._captured = None
        if output is None:
            raise LayerNotReached(
                f"the layer {type(self.layer).__name__} was never reached by the model's forward pass; "
                "pass a module that the model calls (e.g. model.layer4 for a ResNet)"
            )
        if not isinstance(output, Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"the layer's output must be a feature map of shape (B, C, h, w), got {shape}")
        return output

    def __call__(self, images: Tensor, index: Tensor) -> Tensor:
        features = self.activations(images)
        rows, cols = self.locations[index].unbind(dim=1)
        batch = torch.arange(features.shape[0], device=features.device)
        return full_precision(features[batch, :, rows, cols]).abs().sum(dim=1)


def resolve_layer(model: nn.Module, layer: Union[str, nn.Module]) -> nn.Module:
    """A submodule given as a module or as a dotted name such as ``"layer4"`` or ``"features.28"``.

    Names resolve alike with or without the ``net.`` prefix of a wrapper (``find_submodule``), so a
    name means the same module in either input space; an unknown one is an error listing close names.
    """
    if isinstance(layer, str):
        return find_submodule(model, layer)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module or a dotted submodule name, got {type(layer).__name__}")
    if not any(candidate is layer for candidate in model.modules()):
        raise ValueError(f"the layer {type(layer).__name__} is not a submodule of the model")
    return layer


def check_runs_once(model: nn.Module, layer: nn.Module, example: Tensor) -> None:
    """Refuse a ``layer`` that one forward pass of ``example[:1]`` runs more or less than once.

    A module called twice (an activation shared by the stem and the head) would give a hook the
    activations and gradients of one of its calls only, and so a wrong map without any error.
    """
    calls = 0

    def count(*_) -> None:
        nonlocal calls
        calls += 1

    handle = layer.register_forward_hook(count)
    try:
        with explaining(model), torch.no_grad():
            model(example[:1].detach().clone())
    finally:
        handle.remove()
    name = module_name(model, layer)
    if calls == 0:
        raise LayerNotReached(
            f"the layer {name!r} ({type(layer).__name__}) was never reached by the model's forward pass; "
            "pass a module that the model calls (e.g. model.layer4 for a ResNet)"
        )
    if calls > 1:
        raise ValueError(
            f"the layer {name!r} ({type(layer).__name__}) runs {calls} times in one forward pass, so its hooked "
            "activations and gradients would mix those calls; choose a module that runs once (a block or a "
            "convolution; fame.models.target_layer(model) gives one)"
        )


def grid_locations(height: int, width: int, device=None) -> Tensor:
    """Every (row, col) of an h x w feature map, row-major, shape (h * w, 2)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1).to(device)


def check_locations(locations: Union[Sequence[Tuple[int, int]], Tensor], height: int, width: int, device) -> Tensor:
    """Validate (row, col) pairs against an h x w feature map; returns a (L, 2) long tensor."""
    locations = torch.as_tensor(locations, dtype=torch.long).to(device)
    if locations.dim() == 1 and locations.numel() == 2:
        locations = locations.view(1, 2)
    if locations.dim() != 2 or locations.shape[1] != 2 or locations.shape[0] == 0:
        raise ValueError(f"locations must be (row, col) pairs of shape (L, 2), got shape {tuple(locations.shape)}")
    rows, cols = locations.unbind(dim=1)
    if bool((rows < 0).any() | (rows >= height).any() | (cols < 0).any() | (cols >= width).any()):
        raise ValueError(
            f"locations must lie inside the layer's {height}x{width} feature map (0 <= row < {height}, "
            f"0 <= col < {width}), got {locations.tolist()}"
        )
    return locations
