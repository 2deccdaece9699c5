"""Cascading model randomization: rank correlation and SSIM against scipy / analytic cases, no side effects."""

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from fame.metrics.sanity import (
    cascading_randomization,
    parameterized_layers,
    spearman_correlation,
    structural_similarity_batch,
)


def tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()


def gradient_map(model, images, targets):
    """|d logit_target / d input| summed over channels, scaled to [0, 1] per image."""
    images = images.clone().requires_grad_(True)
    logits = model(images)
    logits.gather(1, targets.view(-1, 1)).sum().backward()
    saliency = images.grad.abs().sum(dim=1, keepdim=True)
    return saliency / saliency.flatten(1).max(dim=1).values.view(-1, 1, 1, 1).clamp(min=1e-12)


def test_spearman_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    first = torch.round(torch.rand(4, 1, 6, 5, generator=generator) * 5)
    second = torch.rand(4, 1, 6, 5, generator=generator)
    ours = spearman_correlation(first, second)
    for b in range(4):
        expected = spearmanr(first[b].flatten().numpy(), second[b].flatten().numpy()).statistic
        assert ours[b].item() == pytest.approx(expected, abs=1e-5)
    assert spearman_correlation(first, first).tolist() == pytest.approx([1.0] * 4)
    assert spearman_correlation(first, -first).tolist() == pytest.approx([-1.0] * 4)
    assert torch.isnan(spearman_correlation(torch.ones(1, 1, 4, 4), first[:1, :, :4, :4])).all()


def test_ssim_of_identical_and_different_maps():
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(2, 1, 16, 16, generator=generator)
    assert structural_similarity_batch(maps, maps).tolist() == pytest.approx([1.0, 1.0])
    assert (structural_similarity_batch(maps, 1 - maps) < 0).all()


def test_cascading_randomization_changes_gradient_maps_and_not_the_model():
    model = tiny_classifier()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 2])
    assert parameterized_layers(model) == ["7", "3", "1", "0"]
    result = cascading_randomization(model, gradient_map, images, targets, torch.Generator().manual_seed(3))
    assert result.layers == ["7", "3", "1", "0"]
    assert result.spearman.shape == result.ssim.shape == (4, 2)
    assert (result.spearman[-1] < 0.9).all()  # a fully random network gives different gradients
    for name, value in model.state_dict().items():
        assert value.equal(before[name]), f"{name} of the caller's model changed"
    assert all(parameter.grad is None for parameter in model.parameters())
    again = cascading_randomization(model, gradient_map, images, targets, torch.Generator().manual_seed(3))
    assert again.spearman.equal(result.spearman)


def test_a_model_independent_map_passes_unchanged():
    model = tiny_classifier()
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))

    def edge_map(model, images, targets):  # ignores the model: the failure Adebayo et al. expose
        return images.mean(dim=1, keepdim=True)

    result = cascading_randomization(model, edge_map, images, torch.tensor([0, 1]), torch.Generator().manual_seed(5), layers=["7", "0"])
    assert result.layers == ["7", "0"]
    torch.testing.assert_close(result.spearman, torch.ones(2, 2))
    torch.testing.assert_close(result.ssim, torch.ones(2, 2))
    with pytest.raises(ValueError, match="parameterized_layers"):
        cascading_randomization(model, edge_map, images, torch.tensor([0, 1]), torch.Generator(), layers=["head"])
