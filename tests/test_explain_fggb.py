"""FGGB (Lu et al., FG 2024) against its literal one-dimension-at-a-time definition."""

import numpy as np
import pytest
import torch
from literal_baselines import literal_fggb
from nets import TinyEmbedder

from fame.explain.fggb import fggb_blur, fggb_maps


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_blur_scales_from_112_px():
    assert fggb_blur((112, 112)) == (25, 5.0)
    kernel, sigma = fggb_blur((64, 64))
    assert kernel == 15 and abs(sigma - 5 * 64 / 112) < 1e-12


@pytest.mark.parametrize("gradient_of", ["normalized", "raw"])
def test_fggb_equals_literal_per_dimension_loop(gradient_of):
    model = TinyEmbedder(size=12).double()
    images = torch.rand(2, 3, 12, 12, generator=generator(1), dtype=torch.float64)
    references = torch.cat(
        [
            images[:1] + 0.05 * torch.rand(1, 3, 12, 12, generator=generator(3), dtype=torch.float64),
            torch.rand(1, 3, 12, 12, generator=generator(2), dtype=torch.float64),
        ]
    )
    for threshold in (0.3, 0.9):
        maps = fggb_maps(
            model,
            images,
            references,
            threshold=threshold,
            blur_kernel=5,
            blur_sigma=1.0,
            batch_size=5,
            gradient_of=gradient_of,
        )
        similar, dissimilar = literal_fggb(model, images, references, threshold, 5, 1.0, gradient_of)
        np.testing.assert_allclose(maps["similar"][:, 0].numpy(), similar, atol=1e-10)
        np.testing.assert_allclose(maps["dissimilar"][:, 0].numpy(), dissimilar, atol=1e-10)
    assert maps["similar"].amax() > 0.99 and maps["dissimilar"].amax() > 0.99  # theta 0.9: both parts present


def test_raw_and_normalized_gradients_give_different_maps_and_other_values_are_refused():
    model = TinyEmbedder(size=12).double()
    images = torch.rand(2, 3, 12, 12, generator=generator(7), dtype=torch.float64)
    references = torch.rand(2, 3, 12, 12, generator=generator(8), dtype=torch.float64)
    options = dict(threshold=0.9, blur_kernel=0)
    raw = fggb_maps(model, images, references, gradient_of="raw", **options)["dissimilar"]
    normalized = fggb_maps(model, images, references, **options)["dissimilar"]
    assert (raw - normalized).abs().max() > 0.05  # d e_k / dx carries the norm's gradient, d phi_k / dx does not
    with pytest.raises(ValueError, match="gradient_of must be one of normalized, raw, got 'unit'"):
        fggb_maps(model, images, references, gradient_of="unit", **options)


def test_batched_equals_one_at_a_time_and_model_is_left_alone():
    model = TinyEmbedder(size=12).train()
    images = torch.rand(3, 3, 12, 12, generator=generator(4))
    references = torch.rand(3, 3, 12, 12, generator=generator(5))
    with torch.inference_mode():
        batched = fggb_maps(model, images, references, threshold=0.9, blur_kernel=3, blur_sigma=1.0)
    for b in range(3):
        single = fggb_maps(
            model, images[b : b + 1], references[b : b + 1], threshold=0.9, blur_kernel=3, blur_sigma=1.0, batch_size=1
        )
        for key in ("similar", "dissimilar"):
            torch.testing.assert_close(batched[key][b : b + 1], single[key], atol=1e-5, rtol=1e-5)
    assert all(m.training for m in model.modules()) and all(
        p.grad is None and p.requires_grad for p in model.parameters()
    )


class RegionEmbedder(torch.nn.Module):
    """phi(x) = (mean of rows 2-5, cols 7-10; 0.5): only that region has a gradient."""

    def forward(self, x):
        region = x[:, :, 2:6, 7:11].mean(dim=(1, 2, 3))
        return torch.stack([region, torch.full_like(region, 0.5)], dim=1)


def test_fggb_stays_on_the_region_with_gradient():
    images = torch.rand(2, 3, 12, 12, generator=generator(6)) + 0.2
    maps = fggb_maps(RegionEmbedder(), images, torch.full((2, 3, 12, 12), 10.0), threshold=0.0, blur_kernel=0)
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[2:6, 7:11] = True
    similar = maps["similar"][:, 0]
    assert similar[:, ~inside].max() == 0 and similar[:, inside].min() > 0.99  # uniform |gradient| inside
    assert maps["dissimilar"].max() == 0  # cos > theta = 0 and every weight v_k >= 0
