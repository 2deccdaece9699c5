"""CorrRISE (Lu et al., WACV 2024) against its literal per-pixel Spearman definition."""

import numpy as np
import pytest
import torch
from literal_baselines import literal_corrrise, literal_corrrise_masks
from nets import TinyEmbedder
from scipy.stats import rankdata

from fame.explain.corrrise import average_ranks, corrrise_maps, corrrise_masks, corrrise_patch_size


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_masks_hold_three_patches_fully_inside():
    keep = corrrise_masks(40, (10, 12), patches=3, patch_size=4, generator=generator())
    assert keep.shape == (40, 10, 12) and keep.dtype == torch.bool
    np.testing.assert_array_equal(keep.numpy(), literal_corrrise_masks(generator(), 40, (10, 12), 3, 4))
    black = (~keep).flatten(1).sum(dim=1)
    assert black.min() >= 16 and black.max() <= 48
    assert corrrise_patch_size((112, 112)) == 30 and corrrise_patch_size((64, 64)) == 17
    with pytest.raises(ValueError, match="patch_size must be in"):
        corrrise_masks(4, (8, 8), patch_size=9)


def test_average_ranks_match_scipy_with_ties():
    values = torch.tensor([[0.3, 0.1, 0.3, 0.2, 0.1, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    np.testing.assert_array_equal(average_ranks(values).numpy(), np.stack([rankdata(v) for v in values.numpy()]))


def test_corrrise_equals_literal_per_pixel_spearman():
    model = TinyEmbedder(size=10).double()
    images = torch.rand(2, 3, 10, 10, generator=generator(1), dtype=torch.float64)
    references = torch.rand(2, 3, 10, 10, generator=generator(2), dtype=torch.float64)
    maps = corrrise_maps(model, images, references, masks=30, patch_size=3, batch_size=7, generator=generator(4))
    keep = literal_corrrise_masks(generator(4), 30, (10, 10), 3, 3)
    similar, dissimilar = literal_corrrise(model, images, references, keep)
    np.testing.assert_allclose(maps["similar"][:, 0].numpy(), similar, atol=1e-9)
    np.testing.assert_allclose(maps["dissimilar"][:, 0].numpy(), dissimilar, atol=1e-9)
    assert maps["similar"].amax(dim=(1, 2, 3)).min() > 0.99 and maps["dissimilar"].amax(dim=(1, 2, 3)).min() > 0.99


def test_batched_equals_one_at_a_time_and_model_is_left_alone():
    model = TinyEmbedder(size=10).train()
    images = torch.rand(3, 3, 10, 10, generator=generator(5))
    references = torch.rand(3, 3, 10, 10, generator=generator(6))
    with torch.inference_mode():
        batched = corrrise_maps(model, images, references, masks=25, patch_size=3, batch_size=8, generator=generator(7))
    for b in range(3):
        single = corrrise_maps(
            model, images[b : b + 1], references[b : b + 1], masks=25, patch_size=3, generator=generator(7)
        )
        for key in ("similar", "dissimilar"):
            torch.testing.assert_close(batched[key][b : b + 1], single[key], atol=1e-5, rtol=1e-5)
    assert all(m.training for m in model.modules()) and all(
        p.grad is None and p.requires_grad for p in model.parameters()
    )


class RegionEmbedder(torch.nn.Module):
    """phi(x) = (mean of rows 2-5, cols 7-10; 0.5): against a reference (10, 0.5) the similarity
    grows with every pixel of that region and no other pixel matters."""

    def forward(self, x):
        region = x[:, :, 2:6, 7:11].mean(dim=(1, 2, 3))
        return torch.stack([region, torch.full_like(region, 0.5)], dim=1)


def test_corrrise_finds_the_region_the_similarity_depends_on():
    images = torch.rand(3, 3, 12, 12, generator=generator(8)) + 0.2
    maps = corrrise_maps(
        RegionEmbedder(), images, torch.full((3, 3, 12, 12), 10.0), masks=200, patch_size=3, generator=generator(9)
    )
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[2:6, 7:11] = True
    similar = maps["similar"][:, 0]
    assert inside.flatten()[similar.flatten(1).argmax(dim=1)].all()
    assert (similar[:, inside].mean(dim=1) > 5 * similar[:, ~inside].mean(dim=1)).all()
    assert maps["dissimilar"][:, 0][:, inside].max() == 0
