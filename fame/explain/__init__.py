"""Explainers as pure functions on tensors: FAME and the baselines it is compared with."""

from .batching import CPU_MAX_BATCH, find_batch_size, ram_fits, trial_fits
from .engine import (
    TASK_DEFAULT,
    TASK_EPSILONS,
    FameConfig,
    FameStats,
    Perturbation,
    attribution_map,
    blur_maps,
    explain,
    lots_perturbation,
    normalize_maps,
    to_gray,
)
from .fame import explain_classification, explain_feature_map, explain_verification, feature_map_size
from .guard import explaining
from .objectives import CLASSIFICATION_LOSSES, LayerNotReached, classification_loss
from .precision import PRECISIONS
from .registry import MethodResult, get_method, method_names, register_method

__all__ = [
    "CLASSIFICATION_LOSSES",
    "CPU_MAX_BATCH",
    "PRECISIONS",
    "TASK_DEFAULT",
    "TASK_EPSILONS",
    "FameConfig",
    "FameStats",
    "LayerNotReached",
    "MethodResult",
    "Perturbation",
    "attribution_map",
    "blur_maps",
    "classification_loss",
    "explain",
    "explain_classification",
    "explain_feature_map",
    "explain_verification",
    "explaining",
    "feature_map_size",
    "find_batch_size",
    "get_method",
    "lots_perturbation",
    "method_names",
    "normalize_maps",
    "ram_fits",
    "register_method",
    "to_gray",
    "trial_fits",
]
