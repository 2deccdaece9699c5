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

from .verification import (  # noqa: E402  (face verification, DESIGN.md sec. 3)
    accuracy_at_threshold,
    best_accuracy_threshold,
    eer_threshold,
    roc_curve,
    tar_at_far,
    ten_fold_accuracy,
    verification_report,
)

__all__ += [
    "accuracy_at_threshold",
    "best_accuracy_threshold",
    "eer_threshold",
    "roc_curve",
    "tar_at_far",
    "ten_fold_accuracy",
    "verification_report",
]
