"""FAME: Feature Activation Map Explanation (Zhang & Günther, CVPR Workshops 2026)."""

from .explain import (
    FameConfig,
    FameStats,
    explain,
    explain_classification,
    explain_feature_map,
    explain_verification,
)

__version__ = "0.1.0"

__all__ = [
    "FameConfig",
    "FameStats",
    "explain",
    "explain_classification",
    "explain_feature_map",
    "explain_verification",
]
