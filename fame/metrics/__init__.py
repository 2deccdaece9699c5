"""Scores of attribution maps: localisation against ground truth (faithfulness and verification follow)."""

from .localization import (
    LOCALIZATION_METRICS,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    threshold_iou,
    top_k_iou,
)

__all__ = [
    "LOCALIZATION_METRICS",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "threshold_iou",
    "top_k_iou",
]
