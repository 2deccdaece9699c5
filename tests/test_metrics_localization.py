"""Localisation metrics against literal per-pixel re-implementations, scikit-learn and analytic cases."""

import pytest
import torch

from fame.metrics.localization import (
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


def literal_scores(saliency, mask):
    """Plain-Python definitions for one map (H, W) and mask (H, W)."""
    flat, inside = saliency.flatten().tolist(), [bool(v > 0.5) for v in mask.flatten().tolist()]
    best = max(range(len(flat)), key=lambda i: (flat[i], -i))  # first maximum in raster order
    pointing = 1.0 if inside[best] else 0.0
    total = sum(max(v, 0.0) for v in flat)
    mass = sum(max(v, 0.0) for v, m in zip(flat, inside) if m) / total if total > 0 else 0.0
    k = sum(inside)
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
    rank = sum(inside[i] for i in order[:k]) / k if k else 0.0
    top_five = sum(inside[i] for i in order[:5]) / 5
    return pointing, mass, rank, top_five


def test_against_literal_definitions():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 9, 7, generator=generator)
    maps[0] = torch.round(maps[0] * 3) / 3  # ties
    masks = (torch.rand(6, 1, 9, 7, generator=generator) > 0.7).float()
    fast = [
        pointing_game(maps, masks),
        relevance_mass_accuracy(maps, masks),
        relevance_rank_accuracy(maps, masks),
        top_k_intersection(maps, masks, 5),
    ]
    for b in range(6):
        expected = literal_scores(maps[b, 0], masks[b, 0])
        for metric, value in zip(fast, expected):
            assert metric[b].item() == pytest.approx(value, abs=1e-6)


def test_analytic_cases():
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2, :2] = 1
    perfect = masks.clone()
    inverted = 1 - masks
    maps = torch.cat([perfect[:1], inverted[1:]])
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]
    assert relevance_mass_accuracy(maps, masks).tolist() == [1.0, 0.0]
    assert relevance_rank_accuracy(maps, masks).tolist() == [1.0, 0.0]
    assert pr_auc(maps, masks).tolist() == [1.0, 0.25]  # inverted: all 16 pixels tied at 0 or after
    assert threshold_iou(maps, masks, 0.5).tolist() == [1.0, 0.0]
    uniform = torch.ones(1, 1, 4, 4)
    assert relevance_mass_accuracy(uniform, masks[:1]).item() == pytest.approx(0.25)
    assert pr_auc(uniform, masks[:1]).item() == pytest.approx(0.25)  # the mask's share of the image
    assert threshold_iou(uniform, masks[:1], 0.5).item() == pytest.approx(0.25)
    empty = torch.zeros(1, 1, 4, 4)
    assert relevance_mass_accuracy(empty, masks[:1]).item() == 0.0
    assert pr_auc(maps[:1], empty).item() == 0.0
    assert threshold_iou(empty, empty, 0.5).item() == 0.0
    for name in (
        "pointing_game",
        "pointing_game_15px",
        "relevance_mass",
        "relevance_rank",
        "pr_auc",
        "iou_30",
        "iou_50",
        "iou_70",
    ):
        assert LOCALIZATION_METRICS[name](maps, masks).shape == (2,)
    assert "top_k_iou" not in LOCALIZATION_METRICS


def test_pr_auc_equals_scikit_learn_average_precision():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(5, 1, 8, 8, generator=generator)
    maps[1] = torch.round(maps[1] * 4) / 4  # tied values enter together
    masks = (torch.rand(5, 1, 8, 8, generator=generator) > 0.6).float()
    ours = pr_auc(maps, masks)
    for b in range(5):
        expected = metrics.average_precision_score(masks[b].flatten().numpy(), maps[b].flatten().numpy())
        assert ours[b].item() == pytest.approx(expected, abs=1e-6)


def test_threshold_iou_against_boxes():
    masks = boxes_to_masks(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 6.0, 5.0]]), (5, 6))
    assert masks.shape == (2, 1, 5, 6)
    assert masks[0, 0].nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]  # rows 2-3, columns 1-2
    assert masks[1].sum().item() == 30
    union = boxes_to_masks([torch.tensor([[0.0, 0.0, 2.0, 2.0], [4.0, 3.0, 6.0, 5.0]])], (5, 6))
    assert union.sum().item() == 8
    maps = torch.zeros(2, 1, 5, 6)
    maps[0, 0, 2:4, 1:3] = 0.6
    maps[0, 0, 2, 3] = 0.4
    maps[1] = maps[0]
    assert threshold_iou(maps, masks, 0.3).tolist() == pytest.approx([4 / 5, 5 / 30])
    assert threshold_iou(maps, masks, 0.5).tolist() == pytest.approx([1.0, 4 / 30])
    assert threshold_iou(maps, masks, 0.7).tolist() == [0.0, 0.0]


def test_pointing_game_circular_tolerance_and_shapes():
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 4, 4] = 1
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 2, 4] = 1  # 2 px straight above the mask
    assert pointing_game(maps, masks).item() == 0.0
    assert pointing_game(maps, masks, tolerance=2).item() == 1.0
    diagonal = torch.zeros(1, 1, 8, 8)
    diagonal[0, 0, 2, 2] = 1  # 2 * sqrt(2) px away: inside a square of 2 px, outside the circle
    assert pointing_game(diagonal, masks, tolerance=2).item() == 0.0
    assert pointing_game(diagonal, masks, tolerance=2.9).item() == 1.0
    assert standard_tolerance(224, 300) == 15.0
    assert standard_tolerance(112, 112) == 7.5
    assert pointing_game(maps, masks, tolerance="standard").item() == 0.0  # 15 * 8 / 224 < 1 px
    assert pointing_game(maps[:, 0], masks[:, 0]).item() == 0.0  # (B, H, W) accepted
    with pytest.raises(ValueError, match="share shape"):
        pointing_game(maps, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="standard"):
        pointing_game(maps, masks, tolerance="wide")


def test_pointing_game_ties_and_class_mean():
    masks = torch.zeros(1, 1, 3, 3)
    masks[0, 0, 2, 2] = 1
    tied = torch.zeros(1, 1, 3, 3)
    tied[0, 0, 0, 0] = tied[0, 0, 2, 2] = 1
    assert pointing_game(tied, masks).item() == 0.0  # the first maximum in raster order is the point
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    labels = torch.tensor([0, 0, 0, 1, 1])
    assert class_mean(scores, labels).item() == pytest.approx((1 / 3 + 1) / 2)


def test_masks_and_boxes_of_the_wrong_shape_are_refused():
    maps = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"masks must have shape \(B, 1, H, W\) or \(B, H, W\), got \(2, 2, 8, 8\)"):
        pointing_game(maps, torch.ones(2, 2, 8, 8))
    with pytest.raises(ValueError, match=r"boxes must be \(x_min, y_min, x_max, y_max\).*shape \(1, 3\)"):
        boxes_to_masks(torch.ones(2, 3), (8, 8))
