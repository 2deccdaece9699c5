"""Every explanation method by name and task, behind one calling convention.

    classification: fn(model, images, targets, *, ids, **options) -> MethodResult
    verification:   fn(model, images, references, *, ids, **options) -> MethodResult

``references`` are the other images of the pairs, one per image; their embeddings are computed
once and frozen, so a verification map explains ``images`` only (swap the roles for the other
side). ``ids`` are the samples' stable ids (seeds of the random floor). ``options`` are the keys
of the method's config file ``configs/explainer/<name>.yaml`` besides ``_target_`` and ``name``.

A config file builds its method through :func:`fame.tasks.explainer` (its ``_target_``), which the
explain stage calls with the task. A new method plugs in with one function and one config file::

    # my_pkg/methods.py
    from fame.explain.registry import MethodResult, register_method
    from fame.tasks import explainer

    @register_method("my_method", "classification")
    def my_method(model, images, targets, *, ids, strength=1.0):
        return MethodResult({"": maps})

    # configs/explainer/my_method.yaml (# @package explainer.my_method)
    _target_: my_pkg.methods.explainer   # building it imports my_pkg.methods, which registers my_method
    name: my_method
    strength: 1.0
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from functools import wraps
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..models import target_layer
from .baselines import CosineSimilarityTarget, cam_maps, centre_gaussian_maps, random_maps, sobel_maps
from .corrrise import corrrise_maps
from .engine import FameConfig, FameStats, check_images
from .fame import embed, explain_classification, explain_verification
from .fggb import DEFAULT_THRESHOLD, fggb_maps
from .guard import explaining
from .objectives import VERIFICATION_MODES, resolve_layer
from .rise import rise_maps

#: Rounding slack above 1 for maps normalized in float32.
MAP_TOLERANCE = 1e-5


@dataclass
class MethodResult:
    """Maps by output name, each (B, 1, H, W) in [0, 1]: "" for a method's single map,
    "similar" / "dissimilar" for verification methods; FAME also returns its per-sample
    statistics under the same keys."""

    maps: Dict[str, Tensor]
    stats: Dict[str, FameStats] = field(default_factory=dict)


_METHODS: Dict[Tuple[str, str], Callable[..., MethodResult]] = {}


def _check_task(task: str) -> None:
    """ValueError for a task no method is registered for."""
    known = sorted(dict.fromkeys(method_task for _, method_task in _METHODS))
    if task not in known:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(map(repr, known))}")


def _option_names(fn: Callable) -> List[str]:
    parameters = inspect.signature(fn).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "ids"]


def _checked(name: str, task: str, fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
    """``fn`` with its inputs (ids, options) and its result (shapes, range, NaN) checked; the
    ``options`` attribute lists its named options (a method taking ``**options`` accepts more)."""
    signature = inspect.signature(fn)
    takes_any_option = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    known = _option_names(fn)

    def check_options(options: Dict[str, object]) -> None:
        unknown = sorted(set(options) - set(known))
        if unknown and not takes_any_option:
            raise ValueError(
                f"{name} ({task}) has no option {', '.join(map(repr, unknown))}; its options are "
                f"{', '.join(known) or 'none'} (configs/explainer/{name}.yaml)"
            )

    @wraps(fn)
    def method(model: nn.Module, images: Tensor, other, *, ids: Sequence[str], **options) -> MethodResult:
        check_images(images)
        ids = [str(sample_id) for sample_id in ids]
        if len(ids) != images.shape[0]:
            raise ValueError(f"{name}: ids must hold one sample id per image ({images.shape[0]}), got {len(ids)}")
        check_options(options)
        result = fn(model, images, other, ids=ids, **options)
        expected = (images.shape[0], 1, *images.shape[-2:])
        for key, maps in result.maps.items():
            if tuple(maps.shape) != expected:
                raise RuntimeError(f"{name} returned {key!r} maps of shape {tuple(maps.shape)}, expected {expected}")
            if not bool(((maps >= 0) & (maps <= 1 + MAP_TOLERANCE)).all()):
                if not bool(torch.isfinite(maps).all()):
                    raise RuntimeError(
                        f"{name} returned NaN or Inf in its {key!r} maps; check the images and the model's "
                        "outputs for NaN/Inf"
                    )
                raise RuntimeError(
                    f"{name} returned {key!r} maps outside [0, 1] (from {float(maps.min()):.4g} to "
                    f"{float(maps.max()):.4g}); normalize each map, e.g. with fame.explain.normalize_maps"
                )
        return result

    method.options = known
    method.check_options = check_options
    return method


def register_method(name: str, task: str) -> Callable[[Callable[..., MethodResult]], Callable[..., MethodResult]]:
    """Decorator registering ``fn(model, images, targets_or_references, *, ids, **options)`` as ``name`` for
    ``task`` (a name of :func:`fame.tasks.task_names`, or of a task of your own)."""
    if not isinstance(task, str) or not task:
        raise ValueError(f"register_method needs a task name, got {task!r}")

    def decorator(fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if (name, task) in _METHODS:
            raise ValueError(f"a {task} method named {name!r} is already registered; pick another name")
        _METHODS[(name, task)] = _checked(name, task, fn)
        return fn

    return decorator


def get_method(name: str, task: str) -> Callable[..., MethodResult]:
    """The registered method ``name`` of ``task`` (inputs and outputs checked)."""
    _check_task(task)
    if (name, task) not in _METHODS:
        raise ValueError(f"unknown {task} method {name!r}; known {task} methods: {', '.join(method_names(task))}")
    return _METHODS[(name, task)]


def method_names(task: str) -> List[str]:
    """Names of the methods registered for ``task``, sorted."""
    _check_task(task)
    return sorted(method for method, method_task in _METHODS if method_task == task)


def fame_config(options: dict, task: str) -> FameConfig:
    """A FameConfig from config-file options (lists become tuples)."""
    names = [f.name for f in fields(FameConfig)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        registered = _METHODS.get(("fame", task))
        known = (registered.options if registered is not None else []) + names
        raise ValueError(
            f"fame ({task}) has no option {', '.join(map(repr, unknown))}; its options are {', '.join(known)}"
        )
    return FameConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in options.items()})


def layer_of(model: nn.Module, layer: Optional[str], method: str = "gradcam") -> Optional[nn.Module]:
    """The CAM target layer: the named submodule, or :func:`fame.models.target_layer` of the model
    (FullGrad needs none: it reads every bias)."""
    if method == "fullgrad":
        return None
    return target_layer(model) if layer is None else resolve_layer(model, layer)


def reference_embeddings(model: nn.Module, references: Tensor, batch: int) -> Tensor:
    """The frozen embeddings (B, D) of the pairs' other images, one per image, in eval mode."""
    check_images(references, "references")
    if references.shape[0] != batch:
        raise ValueError(f"references must hold one image per image ({batch}), got {references.shape[0]}")
    with explaining(model):
        return embed(model, references.detach().clone())


# --- classification ---------------------------------------------------------------------------


@register_method("fame", "classification")
def fame_classification(model, images, targets, *, ids, loss: str = "logit", **options) -> MethodResult:
    """FAME (the FAME paper); options are the FameConfig fields and the loss
    ("logit", "abs_logit", "log_softmax", "probability", "margin")."""
    maps, stats = explain_classification(
        model, images, targets, fame_config(options, "classification"), loss=loss, return_stats=True
    )
    return MethodResult({"": maps}, {"": stats})


def cam_classification(method, model, images, targets, layer=None, batch_size=32) -> MethodResult:
    """A CAM of each image's target class."""
    return MethodResult({"": cam_maps(model, layer_of(model, layer, method), images, targets, method, batch_size)})


def cam_verification(method, model, images, references, layer=None, batch_size=32) -> MethodResult:
    """A CAM of s = cos(phi(x), phi_ref) ("similar") and of 1 - s ("dissimilar")."""
    batch = images.shape[0]
    frozen = reference_embeddings(model, references, batch)
    targets = [CosineSimilarityTarget(frozen[b], dissimilar) for dissimilar in (False, True) for b in range(batch)]
    maps = cam_maps(model, layer_of(model, layer, method), images.repeat(2, 1, 1, 1), targets, method, batch_size)
    return MethodResult({"similar": maps[:batch], "dissimilar": maps[batch:]})


def _register_gradient_cam(method: str) -> None:
    @register_method(method, "classification")
    def classification(model, images, targets, *, ids, layer: Optional[str] = None) -> MethodResult:
        return cam_classification(method, model, images, targets, layer)

    @register_method(method, "verification")
    def verification(model, images, references, *, ids, layer: Optional[str] = None) -> MethodResult:
        return cam_verification(method, model, images, references, layer)


for _cam in ("gradcam", "gradcam_elementwise", "hirescam"):
    _register_gradient_cam(_cam)


@register_method("scorecam", "classification")
def scorecam_classification(
    model, images, targets, *, ids, layer: Optional[str] = None, batch_size: int = 32
) -> MethodResult:
    """Score-CAM; ``batch_size`` masked images per forward pass."""
    return cam_classification("scorecam", model, images, targets, layer, batch_size)


@register_method("scorecam", "verification")
def scorecam_verification(
    model, images, references, *, ids, layer: Optional[str] = None, batch_size: int = 32
) -> MethodResult:
    """Score-CAM of the cosine similarity; ``batch_size`` masked images per forward pass."""
    return cam_verification("scorecam", model, images, references, layer, batch_size)


@register_method("fullgrad", "classification")
def fullgrad_classification(model, images, targets, *, ids) -> MethodResult:
    """FullGrad: input gradient and every convolution / batch-norm bias gradient, no layer to choose."""
    return cam_classification("fullgrad", model, images, targets)


@register_method("fullgrad", "verification")
def fullgrad_verification(model, images, references, *, ids) -> MethodResult:
    """FullGrad of the cosine similarity (and of 1 - s)."""
    return cam_verification("fullgrad", model, images, references)


@register_method("rise", "classification")
def rise_classification(
    model,
    images,
    targets,
    *,
    ids,
    masks: int = 4000,
    grid_size: int = 7,
    probability: float = 0.5,
    score: str = "probability",
    batch_size: int = 256,
    normalization: str = "minmax",
    seed: int = 0,
) -> MethodResult:
    """RISE (Petsiuk et al. 2018); one mask set drawn from ``seed`` for every batch."""
    generator = torch.Generator().manual_seed(int(seed))
    return MethodResult(
        {
            "": rise_maps(
                model, images, targets, masks, grid_size, probability, score, batch_size, normalization, generator
            )
        }
    )


# --- verification -----------------------------------------------------------------------------


@register_method("fame", "verification")
def fame_verification(model, images, references, *, ids, **options) -> MethodResult:
    """FAME e+ / e- (the FAME paper); options are the FameConfig fields (epsilon "task": the paper's 0.01)."""
    maps, stats = explain_verification(
        model, images, references, fame_config(options, "verification"), return_stats=True
    )
    return MethodResult(dict(maps), dict(stats))


@register_method("corrrise", "verification")
def corrrise_verification(
    model,
    images,
    references,
    *,
    ids,
    masks: int = 500,
    patches: int = 3,
    patch_size: Optional[int] = None,
    fill: float = 0.0,
    batch_size: int = 256,
    normalization: str = "max",
    seed: int = 0,
) -> MethodResult:
    """CorrRISE (Lu et al., WACV 2024); one mask set drawn from ``seed`` for all pairs."""
    generator = torch.Generator().manual_seed(int(seed))
    return MethodResult(
        corrrise_maps(model, images, references, masks, patches, patch_size, fill, batch_size, normalization, generator)
    )


@register_method("fggb", "verification")
def fggb_verification(
    model,
    images,
    references,
    *,
    ids,
    threshold: float = DEFAULT_THRESHOLD,
    blur_kernel: Optional[int] = None,
    blur_sigma: Optional[float] = None,
    normalization: str = "max",
    batch_size: int = 256,
    gradient_of: str = "normalized",
) -> MethodResult:
    """FGGB (Lu et al., FG 2024); ``threshold`` is the model's EER threshold theta; ``gradient_of``
    the differentiated feature ("normalized" embedding or "raw" feature)."""
    return MethodResult(
        fggb_maps(model, images, references, threshold, blur_kernel, blur_sigma, normalization, batch_size, gradient_of)
    )


# --- floors (both tasks) ----------------------------------------------------------------------


def _register_floors(task: str, outputs: Sequence[str]) -> None:
    """The floors of ``task``, one map per output ("" for a single map, e+ / e- for pairs)."""

    def _floor_result(make: Callable[[str], Tensor]) -> MethodResult:
        return MethodResult({output: make(output) for output in outputs})

    @register_method("random", task)
    def random_floor(model, images, other, *, ids, seed: int = 0) -> MethodResult:
        """Uniform noise seeded per sample id (and per output for verification)."""
        return _floor_result(
            lambda output: random_maps(
                images, [f"{sample_id}/{output}" if output else sample_id for sample_id in ids], seed
            )
        )

    @register_method("centre", task)
    def centre_floor(model, images, other, *, ids, sigma_fraction: float = 0.25) -> MethodResult:
        """A Gaussian bump at the centre; the same map for both verification outputs."""
        maps = centre_gaussian_maps(images, sigma_fraction)
        return _floor_result(lambda output: maps)

    @register_method("sobel", task)
    def sobel_floor(model, images, other, *, ids) -> MethodResult:
        """Sobel edge magnitude of the luma; the same map for both verification outputs."""
        maps = sobel_maps(images)
        return _floor_result(lambda output: maps)


_register_floors("classification", ("",))
_register_floors("verification", VERIFICATION_MODES)


__all__ = [
    "MAP_TOLERANCE",
    "MethodResult",
    "fame_config",
    "get_method",
    "layer_of",
    "method_names",
    "reference_embeddings",
    "register_method",
]
