"""Localisation metrics against literal per-pixel re-implementations and analytic cases."""

import pytest
import torch

from fame.metrics.localization import (
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    threshold_iou,
    top_k_iou,
)


def literal_scores(saliency, mask):
    """Plain-Python definitions for one map (H, W) and mask (H, W)."""
    flat, inside = saliency.flatten().tolist(), [bool(v > 0.5) for v in mask.flatten().tolist()]
    best = max(range(len(flat)), key=lambda i: (flat[i], -i))  # first maximum in raster order
    pointing = 1.0 if inside[best] else 0.0
    total = sum(max(v, 0.0) for v in flat)
    mass = sum(max(v, 0.0) for v, m in zip(flat, inside) if m) / total if total > 0 else 0.0
    k = sum(inside)
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    rank = sum(inside[i] for i in order) / k if k else 0.0
    selected = set(order)
    union = len(selected | {i for i, m in enumerate(inside) if m})
    iou = len(selected & {i for i, m in enumerate(inside) if m}) / union if union else 0.0
    return pointing, mass, rank, iou


def test_against_literal_definitions():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 1, 9, 7, generator=generator)
    maps[0] = torch.round(maps[0] * 3) / 3  # ties
    masks = (torch.rand(6, 1, 9, 7, generator=generator) > 0.7).float()
    fast = [pointing_game(maps, masks), relevance_mass_accuracy(maps, masks),
            relevance_rank_accuracy(maps, masks), top_k_iou(maps, masks)]
    for b in range(6):
        expected = literal_scores(maps[b, 0], masks[b, 0])
        for metric, value in zip(fast, expected):
            assert metric[b].item() == pytest.approx(value, abs=1e-6)


def test_analytic_cases():
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2, :2] = 1
    perfect = masks.clone()
    opposite = 1 - masks
    maps = torch.cat([perfect[:1], opposite[1:]])
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]
    assert relevance_mass_accuracy(maps, masks).tolist() == [1.0, 0.0]
    assert relevance_rank_accuracy(maps, masks).tolist() == [1.0, 0.0]
    assert top_k_iou(maps, masks).tolist() == [1.0, 0.0]
    assert threshold_iou(maps, masks, 0.5).tolist() == [1.0, 0.0]
    uniform = torch.ones(1, 1, 4, 4)
    assert relevance_mass_accuracy(uniform, masks[:1]).item() == pytest.approx(0.25)
    empty = torch.zeros(1, 1, 4, 4)
    assert relevance_mass_accuracy(empty, masks[:1]).item() == 0.0
    assert not torch.isnan(top_k_iou(empty, torch.zeros(1, 1, 4, 4))).any()


def test_pointing_game_tolerance_and_shapes():
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 4, 4] = 1
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 2, 4] = 1
    assert pointing_game(maps, masks).item() == 0.0
    assert pointing_game(maps, masks, tolerance=2).item() == 1.0
    assert pointing_game(maps[:, 0], masks[:, 0]).item() == 0.0  # (B, H, W) accepted
    with pytest.raises(ValueError, match="share shape"):
        pointing_game(maps, torch.zeros(1, 1, 4, 4))
