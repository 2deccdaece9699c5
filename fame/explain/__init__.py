"""Explainers as pure functions on tensors: FAME and the baselines it is compared with."""

from .engine import (
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
from .objectives import LayerNotReached

__all__ = [
    "FameConfig",
    "FameStats",
    "Perturbation",
    "LayerNotReached",
    "attribution_map",
    "blur_maps",
    "explain",
    "explain_classification",
    "explain_feature_map",
    "explain_verification",
    "explaining",
    "feature_map_size",
    "lots_perturbation",
    "normalize_maps",
    "to_gray",
]
