"""Cascading model randomization: rank correlation and SSIM against scipy / analytic cases, no side effects."""

import copy
from collections import OrderedDict

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from fame.metrics.sanity import (
    cascading_randomization,
    layer_blocks,
    parameterized_layers,
    randomize_parameters_,
    spearman_correlation,
    structural_similarity_batch,
)


def tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
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

    result = cascading_randomization(
        model, edge_map, images, torch.tensor([0, 1]), torch.Generator().manual_seed(5), layers=["7", "0"]
    )
    assert result.layers == ["7", "0"]
    torch.testing.assert_close(result.spearman, torch.ones(2, 2))
    torch.testing.assert_close(result.ssim, torch.ones(2, 2))
    with pytest.raises(ValueError, match="parameterized_layers"):
        cascading_randomization(model, edge_map, images, torch.tensor([0, 1]), torch.Generator(), layers=["head"])


def block_classifier():
    torch.manual_seed(1)
    return nn.Sequential(
        OrderedDict(
            body=nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
            ),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            head=nn.Linear(4, 3),
        )
    ).eval()


class Wrapper(nn.Module):
    """Like fame.models.Classifier: all parameters in one child ``net``."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("scale", torch.ones(1))

    def forward(self, images):
        return self.net(images * self.scale)


def test_layer_blocks_are_the_top_level_children_with_parameters_output_first():
    model = block_classifier()
    assert layer_blocks(model) == ["head", "body"]
    assert layer_blocks(Wrapper(model)) == ["net.head", "net.body"]  # a one-child wrapper is looked through
    assert layer_blocks(tiny_classifier()) == ["7", "3", "1", "0"]
    assert layer_blocks(nn.Linear(2, 2)) == [""]
    assert parameterized_layers(model) == ["head", "body.3", "body.1", "body.0"]


def test_redrawing_a_block_redraws_its_whole_subtree_and_nothing_else():
    model = Wrapper(block_classifier())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    states = []

    def recording_map(network, images, targets):  # records the weights each map is computed with
        states.append({name: value.clone() for name, value in network.state_dict().items()})
        return images.mean(dim=1, keepdim=True)

    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    result = cascading_randomization(
        model,
        recording_map,
        images,
        torch.tensor([0, 1]),
        torch.Generator().manual_seed(7),
        layers=layer_blocks(model),
        randomization="redraw",
    )
    assert result.layers == ["net.head", "net.body"] and len(states) == 3
    intact, head_only, both = states
    parameters = {name for name, _ in model.named_parameters()}
    for name, value in intact.items():
        assert value.equal(before[name])
        in_head = name.startswith("net.head.")
        if name not in parameters:  # buffers (batch-norm statistics, the wrapper's scale) stay
            assert head_only[name].equal(value) and both[name].equal(value), name
            continue
        assert head_only[name].equal(value) != in_head, name  # step 1: exactly the head changed
        assert not both[name].equal(value), name  # step 2: every parameter changed
        if in_head:
            assert both[name].equal(head_only[name]), name  # earlier steps are kept
    for name, value in model.state_dict().items():
        assert value.equal(before[name]), f"{name} of the caller's model changed"


def test_block_randomization_draws_each_parameter_from_its_own_statistics():
    body = block_classifier().body
    original = {name: value.clone() for name, value in body.named_parameters()}
    randomize_parameters_(body, torch.Generator().manual_seed(8))
    for name, value in body.named_parameters():
        reference = original[name].double()
        drawn = value.detach().double()
        assert not drawn.equal(reference), name
        if reference.numel() > 16:  # the conv weights: the same scale as before
            assert drawn.std().item() == pytest.approx(reference.std().item(), rel=0.5)
            assert abs(drawn.mean().item() - reference.mean().item()) < reference.std().item()


def test_leaf_randomization_is_the_same_with_or_without_recursion():
    first, second = nn.Linear(5, 4), copy.deepcopy(nn.Linear(5, 4))
    second.load_state_dict(first.state_dict())
    randomize_parameters_(first, torch.Generator().manual_seed(9), recurse=False)
    randomize_parameters_(second, torch.Generator().manual_seed(9))
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert a.equal(b), name


def test_a_map_that_becomes_constant_counts_as_uncorrelated():
    from fame.metrics.sanity import cascading_randomization

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    intact = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def explain_fn(network, images, targets):  # the intact maps first, then an empty map for sample 0
        calls.append(1)
        maps = intact.clone()
        if len(calls) > 1:
            maps[0] = 0.0
        return maps

    result = cascading_randomization(
        model,
        explain_fn,
        torch.zeros(2, 4),
        torch.zeros(2, dtype=torch.long),
        torch.Generator().manual_seed(1),
        layers=["1"],
    )
    assert result.spearman[0].tolist() == [0.0, 1.0]
