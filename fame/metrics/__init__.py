"""Scores of attribution maps: localisation against ground truth, faithfulness (deletion / insertion, ROAD),
sanity checks and face verification (docs/method.md#metrics)."""

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

from .verification import (  # noqa: E402  (face verification, docs/method.md#face-recognition-protocol)
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

from .faithfulness import (  # noqa: E402  (deletion / insertion, RISE protocol)
    DEFAULT_FRACTIONS,
    VerificationCurve,
    curve_auc,
    deletion_curve,
    pixel_ranks,
    remove_top_pixels,
    rise_blur,
    top_pixel_mask,
    verification_curve,
)
from .road import RoadCurves, noisy_linear_impute, road_curve, solve_linear_imputation  # noqa: E402
from .sanity import (  # noqa: E402  (Adebayo et al. 2018)
    RandomizationResult,
    cascading_randomization,
    layer_blocks,
    parameterized_layers,
    spearman_correlation,
    structural_similarity_batch,
)

__all__ += [
    "DEFAULT_FRACTIONS",
    "VerificationCurve",
    "curve_auc",
    "deletion_curve",
    "pixel_ranks",
    "remove_top_pixels",
    "rise_blur",
    "top_pixel_mask",
    "verification_curve",
    "RoadCurves",
    "noisy_linear_impute",
    "road_curve",
    "solve_linear_imputation",
    "RandomizationResult",
    "cascading_randomization",
    "layer_blocks",
    "parameterized_layers",
    "spearman_correlation",
    "structural_similarity_batch",
]
