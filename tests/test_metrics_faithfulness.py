"""Deletion / insertion curves and their area on analytic toys with known answers."""

import pytest
import torch
from torch import nn

from fame.metrics.faithfulness import (
    DEFAULT_FRACTIONS,
    curve_auc,
    deletion_curve,
    pixel_ranks,
    remove_top_pixels,
    rise_blur,
    verification_curve,
)


class RegionSum(nn.Module):
    """Two-class model: logit 0 is the sum of the pixels inside ``region``, logit 1 is 0."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, images):
        evidence = (images * self.region).flatten(1).sum(1)
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


def region_toy(size=10, side=5):
    region = torch.zeros(1, 1, size, size)
    region[..., :side, :side] = 1  # a quarter of the image
    images = torch.ones(1, 3, size, size)
    return region, images


def test_remove_top_pixels_counts_ties_and_fill():
    maps = torch.tensor([[[[0.5, 0.9], [0.5, 0.1]]]])
    images = torch.arange(4.0).view(1, 1, 2, 2)
    assert remove_top_pixels(images, maps, 0.25).flatten().tolist() == [0, 0, 2, 3]
    # the tie at 0.5 goes to raster order, both ways
    assert remove_top_pixels(images, maps, 0.5).flatten().tolist() == [0, 0, 2, 3]
    assert remove_top_pixels(images, maps, 0.75).flatten().tolist() == [0, 0, 0, 3]
    assert remove_top_pixels(images, maps, 0.5, most_relevant_first=False, fill=-1).flatten().tolist() == [-1, 1, 2, -1]
    assert remove_top_pixels(images, maps, 0.0).equal(images)
    assert (remove_top_pixels(images, maps, 1.0, fill=7) == 7).all()
    fill = torch.full_like(images, 9.0)
    per_sample = remove_top_pixels(
        images.repeat(2, 1, 1, 1), maps.repeat(2, 1, 1, 1), torch.tensor([0.25, 1.0]), fill.repeat(2, 1, 1, 1)
    )
    assert per_sample.flatten(1).tolist() == [[0, 9, 2, 3], [9, 9, 9, 9]]
    assert pixel_ranks(maps).flatten().tolist() == [1, 0, 2, 3]
    with pytest.raises(ValueError, match="resize the maps"):
        remove_top_pixels(images, torch.zeros(1, 1, 3, 3), 0.5)


def test_deletion_curve_on_region_sum_model():
    region, images = region_toy()
    model = RegionSum(region).eval()
    perfect, inverted, uniform = region, 1 - region, torch.ones_like(region)
    maps = torch.cat([perfect, inverted, uniform])
    batch = images.repeat(3, 1, 1, 1)
    targets = torch.zeros(3, dtype=torch.long)
    curve = deletion_curve(model, batch, maps, targets)
    # the logit at fraction f: 75 - removed region pixels x 3 channels
    region_pixels_removed = torch.tensor(
        [
            [min(round(f * 100), 25) for f in DEFAULT_FRACTIONS],
            [max(round(f * 100) - 75, 0) for f in DEFAULT_FRACTIONS],
            # uniform map: raster order, the region is the left half of the first five rows
            [sum(1 for i in range(round(f * 100)) if i % 10 < 5 and i // 10 < 5) for f in DEFAULT_FRACTIONS],
        ],
        dtype=torch.float,
    )
    expected = torch.sigmoid(75 - 3 * region_pixels_removed)
    torch.testing.assert_close(curve, expected)
    assert curve.shape == (3, 11)
    # perfect map: drops to 0.5 after 25 %; inverted map: stays near 1 until 75 %
    auc = curve_auc(curve, DEFAULT_FRACTIONS)
    assert auc[0] < auc[2] < auc[1]
    torch.testing.assert_close(deletion_curve(model, batch, maps, targets, batch_size=4), curve)


def test_insertion_curve_blur_and_zero_baselines():
    region, images = region_toy()
    model = RegionSum(region).eval()
    curve = deletion_curve(model, images, region, torch.zeros(1, dtype=torch.long), mode="insertion", baseline="zero")
    inserted = torch.tensor([min(round(f * 100), 25) for f in DEFAULT_FRACTIONS], dtype=torch.float)
    torch.testing.assert_close(curve[0], torch.sigmoid(3 * inserted))
    blurred = deletion_curve(model, images, region, torch.zeros(1, dtype=torch.long), mode="insertion")
    # a constant image is its own blur: insertion changes nothing
    torch.testing.assert_close(rise_blur(images), images)
    torch.testing.assert_close(blurred[0], torch.full((11,), torch.sigmoid(torch.tensor(75.0)).item()))
    with pytest.raises(ValueError, match="mode"):
        deletion_curve(model, images, region, torch.zeros(1, dtype=torch.long), mode="sideways")


def test_curve_auc_is_normalized_trapezoid():
    fractions = torch.tensor([0.0, 0.5, 1.0])
    curves = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.5, 1.0]])
    torch.testing.assert_close(curve_auc(curves, fractions), torch.tensor([1.0, 0.25, 0.5]))
    torch.testing.assert_close(curve_auc(curves, [0, 50, 100]), torch.tensor([1.0, 0.25, 0.5]))
    with pytest.raises(ValueError, match="len\\(fractions\\)"):
        curve_auc(curves, [0.0, 1.0])
    with pytest.raises(ValueError, match="must strictly increase"):
        curve_auc(curves, [0.0, 1.0, 0.5])


def test_curves_refuse_targets_and_flags_of_the_wrong_shape():
    region, images = region_toy()
    model = RegionSum(region).eval()
    batch, maps = images.repeat(4, 1, 1, 1), region.repeat(4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"targets must hold one class index per image, shape \(4,\), got \(3,\)"):
        deletion_curve(model, batch, maps, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(4, 1\)"):
        deletion_curve(model, batch, maps, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="fractions is empty"):
        deletion_curve(model, batch, maps, torch.zeros(4, dtype=torch.long), [])
    embedder = RegionEmbedder(region)
    with pytest.raises(ValueError, match=r"same must hold one genuine/impostor flag per pair, shape \(4,\)"):
        verification_curve(embedder, batch, batch, torch.ones(3, dtype=torch.bool), maps, threshold=0.5)


class RegionEmbedder(nn.Module):
    """Two-dimensional embedding: the mean of the pixels inside ``region`` and outside it."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, images):
        inside = (images * self.region).flatten(1).sum(1)
        outside = (images * (1 - self.region)).flatten(1).sum(1)
        return torch.stack([inside, outside], dim=1)


def test_verification_curve_on_region_embedder():
    region, _ = region_toy()  # a quarter of a 10 x 10 image
    embedder = RegionEmbedder(region).eval()
    in_region, out_region = region.expand(1, 3, 10, 10), (1 - region).expand(1, 3, 10, 10)
    # pairs 0, 1 genuine (probe = gallery, content in the region); pairs 2, 3 impostors (gallery outside)
    galleries = torch.cat([in_region, in_region, out_region, out_region])
    probes = in_region.repeat(4, 1, 1, 1)
    same = torch.tensor([True, True, False, False])
    maps = region.repeat(4, 1, 1, 1)  # the perfect e+ map
    deletion = verification_curve(embedder, galleries, probes, same, maps)
    assert deletion.threshold == pytest.approx(0.5)  # midway between the clean genuine 1 and impostors 0
    # genuine pairs survive while any region pixel is left (P < 25 %), impostors stay rejected
    assert deletion.accuracy.tolist() == [1.0, 1.0, 1.0] + [0.5] * 8
    assert deletion.auc == pytest.approx(100 * (0.5 + 0.5 * 2.5 / 10))
    insertion = verification_curve(embedder, galleries, probes, same, maps, mode="insertion", batch_size=3)
    assert insertion.accuracy.tolist() == [0.5] + [1.0] * 10
    assert insertion.auc == pytest.approx(100 * (1 - 0.5 * 0.5 / 10))
    assert insertion.scores.shape == insertion.correct.shape == (4, 11)
    fixed = verification_curve(embedder, galleries, probes, same, maps, threshold=-1.0)
    assert fixed.accuracy.tolist() == [0.5] * 11  # everything accepted
