"""Scores of attribution maps: localisation against ground truth, faithfulness (deletion / insertion, ROAD),
sanity checks and face verification (DESIGN.md sec. 3)."""

from .localization import (
    LOCALIZATION_METRICS,
    boxes_to_masks,
    class_mean,
    pointing_game,
    pr_auc,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    standard_tolerance,
    threshold_iou,
    top_k_intersection,
)

__all__ = [
    "LOCALIZATION_METRICS",
    "boxes_to_masks",
    "class_mean",
    "pointing_game",
    "pr_auc",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "standard_tolerance",
    "threshold_iou",
    "top_k_intersection",
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
