"""Verification metrics against hand-computed values on tiny score lists."""

import math

import pytest
import torch

from fame.metrics.verification import (
    accuracy_at_threshold,
    best_accuracy_threshold,
    eer_threshold,
    fold_bounds,
    roc_curve,
    tar_at_far,
    ten_fold_accuracy,
    verification_report,
)


def test_roc_curve_counts_accepts_at_each_distinct_score():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    thresholds, far, tar = roc_curve(scores, labels)
    assert thresholds.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert far.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert tar.tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1, 1, 1])


def test_eer_threshold_where_far_meets_frr():
    # 0.9: FAR 0, FRR 2/3 | 0.8: 0, 1/3 | 0.7: 1/3, 1/3 (equal) | 0.6: 1/3, 0
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = torch.tensor([True, True, False, True, False, False])
    threshold, eer = eer_threshold(scores, labels)
    assert threshold == pytest.approx(0.65)  # midway between the EER candidate 0.7 and the next score 0.6
    assert eer == pytest.approx(1 / 3)


def test_eer_threshold_ties_go_to_the_largest_threshold():
    # genuine 0.9, 0.5; impostors 0.7, 0.2, 0.1, 0.0
    # 0.9: FAR 0, FRR 1/2 -> 1/2 | 0.7: 1/4, 1/2 -> 1/4 | 0.5: 1/4, 0 -> 1/4 (tie) | 0.2: 1/2, 0
    scores = torch.tensor([0.0, 0.5, 0.1, 0.9, 0.2, 0.7])
    labels = torch.tensor([0, 1, 0, 1, 0, 0])
    threshold, eer = eer_threshold(scores, labels)
    assert threshold == pytest.approx(0.6)  # candidate 0.7, next lower score 0.5
    assert eer == pytest.approx((1 / 4 + 1 / 2) / 2)
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    assert eer_threshold(scores[permutation], labels[permutation]) == (threshold, eer)


def test_eer_threshold_with_a_genuine_and_an_impostor_of_equal_score():
    threshold, eer = eer_threshold(torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert (threshold, eer) == (0.5, 0.5)


def test_eer_threshold_of_separable_scores_is_zero_at_the_lowest_genuine():
    scores = torch.tensor([0.95, 0.9, 0.85, 0.3, 0.2])
    labels = torch.tensor([1, 1, 1, 0, 0])
    assert eer_threshold(scores, labels) == (pytest.approx(0.575), 0.0)  # between 0.85 and 0.3


@pytest.mark.parametrize(
    "labels, message",
    [([1, 1, 1], "all 3 pairs are genuine"), ([0, 0, 0], "all 3 pairs are impostors")],
)
def test_single_class_labels_fail_clearly(labels, message):
    scores = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=message):
        eer_threshold(scores, torch.tensor(labels))
    with pytest.raises(ValueError, match=message):
        tar_at_far(scores, torch.tensor(labels))


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="same length"):
        eer_threshold(torch.tensor([0.1, 0.2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="empty"):
        eer_threshold(torch.tensor([]), torch.tensor([]))
    with pytest.raises(ValueError, match="NaN"):
        eer_threshold(torch.tensor([0.1, float("nan")]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="0/1"):
        eer_threshold(torch.tensor([0.1, 0.2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="far must lie"):
        tar_at_far(torch.tensor([0.1, 0.2]), torch.tensor([1, 0]), far=2.0)


def test_tar_at_far_takes_the_lowest_threshold_within_the_far_budget():
    # genuine 0.9, 0.8, 0.4; impostors 0.85, 0.3
    scores = torch.tensor([0.9, 0.85, 0.8, 0.4, 0.3])
    labels = torch.tensor([1, 0, 1, 1, 0])
    assert tar_at_far(scores, labels, far=0.0) == pytest.approx(1 / 3)  # only 0.9 accepts no impostor
    assert tar_at_far(scores, labels, far=1e-3) == pytest.approx(1 / 3)  # 2 impostors: 1e-3 means none
    assert tar_at_far(scores, labels, far=0.5) == pytest.approx(1.0)  # threshold 0.4 accepts one impostor
    assert tar_at_far(scores, labels, far=1.0) == pytest.approx(1.0)


def test_tar_at_far_is_zero_when_the_top_score_is_an_impostor():
    assert tar_at_far(torch.tensor([0.1, 0.9]), torch.tensor([1, 0]), far=0.0) == 0.0


def test_best_accuracy_threshold_sits_mid_gap_and_prefers_the_largest():
    # candidates +inf: 1/2 | 0.55 (impostor 0.8 accepted, genuine 0.3 rejected): 0 | -inf: 1/2
    assert best_accuracy_threshold(torch.tensor([0.8, 0.3]), torch.tensor([0, 1])) == (math.inf, 0.5)
    assert best_accuracy_threshold(torch.tensor([0.9, 0.2]), torch.tensor([1, 0])) == (pytest.approx(0.55), 1.0)
    assert best_accuracy_threshold(torch.tensor([0.9, 0.2]), torch.tensor([1, 1])) == (-math.inf, 1.0)


def test_accuracy_at_threshold_accepts_scores_equal_to_the_threshold():
    scores = torch.tensor([0.5, 0.5, 0.4])
    assert accuracy_at_threshold(scores, torch.tensor([1, 0, 0]), 0.5) == pytest.approx(2 / 3)


def test_fold_bounds_are_contiguous_like_unshuffled_kfold():
    bounds = fold_bounds(23, 10)
    assert [stop - start for start, stop in bounds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert bounds[0][0] == 0 and bounds[-1][1] == 23
    assert all(previous[1] == current[0] for previous, current in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError, match="cannot be split into 10 folds"):
        fold_bounds(9, 10)


def test_two_fold_accuracy_by_hand():
    # fold 1 = pairs 0, 1 (0.9 genuine, 0.2 impostor); fold 2 = pairs 2, 3 (0.8 impostor, 0.3 genuine)
    # fold 1 held out: trained on fold 2, rejecting all is best (1/2, largest) -> fold 1 scores 1/2
    # fold 2 held out: trained on fold 1, threshold 0.55 (accuracy 1) -> fold 2 gets both wrong
    result = ten_fold_accuracy(
        torch.tensor([0.9, 0.2, 0.8, 0.3]), torch.tensor([1, 0, 0, 1]), folds=2, thresholds="exact"
    )
    assert result["accuracies"].tolist() == [0.5, 0.0]
    assert result["thresholds"].tolist() == pytest.approx([math.inf, 0.55])
    assert result["accuracy_mean"] == 0.25 and result["accuracy_std"] == 0.25


def separable_but_one(fold_zero_genuine: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """10 folds of 2 pairs (a genuine, an impostor); the first fold's genuine pair scores lowest of all."""
    genuine = torch.linspace(0.6, 0.9, 10)
    impostor = torch.linspace(0.1, 0.4, 10)
    scores = torch.stack([genuine, impostor], dim=1).flatten()
    scores[0] = fold_zero_genuine
    return scores, torch.tensor([1, 0] * 10)


def test_ten_fold_accuracy_std_is_the_population_std_over_folds():
    # every fold's exact threshold falls in the gap between impostors (<= 0.4) and the other
    # genuines (>= 0.63), so fold 0 rejects its own genuine pair and every other fold is right
    scores, labels = separable_but_one()
    result = ten_fold_accuracy(scores, labels, thresholds="exact")
    expected = torch.tensor([0.5] + [1.0] * 9, dtype=torch.float64)
    assert torch.equal(result["accuracies"], expected)
    assert result["accuracy_mean"] == pytest.approx(0.95)
    assert result["accuracy_std"] == pytest.approx(0.15)  # sqrt(0.1 * 0.45^2 + 0.9 * 0.05^2)


def test_insightface_threshold_is_the_smallest_best_grid_distance():
    # squared distances 2 - 2 * score: genuines 0.8 - 0.2 (fold 0's: 1.9), impostors 1.8 - 1.2.
    # Held out fold 1 (genuine score 0.6333, distance 0.7333), the training genuines end at
    # distance 0.6667: the first best grid point is 0.67, which rejects fold 1's genuine pair.
    scores, labels = separable_but_one()
    result = ten_fold_accuracy(scores, labels)
    assert result["thresholds"][1].item() == pytest.approx(0.67)
    assert result["accuracies"].tolist() == [0.5, 0.5] + [1.0] * 8
    assert result["thresholds"][0].item() == pytest.approx(0.74)  # fold 0 out: genuines from 0.7333 on


def test_verification_report_collects_every_number():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = torch.tensor([1, 1, 0, 1, 0, 0])
    report = verification_report(scores, labels, folds=2, far=0.0)
    assert set(report) == {
        "accuracy_mean",
        "accuracy_std",
        "eer",
        "eer_threshold",
        "tar_at_far",
        "kfold_val_at_far",
        "kfold_val_std",
        "kfold_far",
    }
    assert report["eer"] == pytest.approx(1 / 3) and report["eer_threshold"] == pytest.approx(0.65)
    assert report["tar_at_far"] == pytest.approx(2 / 3)


def test_eer_threshold_keeps_decisions_of_a_score_recomputed_with_rounding():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = torch.tensor([True, True, False, True, False, False])
    threshold, _ = eer_threshold(scores, labels)
    for nudge in (-1e-6, 0.0, 1e-6):  # the EER candidate 0.7 recomputed in another batch
        moved = scores.clone()
        moved[2] += nudge
        assert ((moved >= threshold) == (scores >= 0.7)).all()
