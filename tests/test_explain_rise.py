"""RISE against its literal per-mask definition (Petsiuk et al. 2018) on a tiny classifier."""

import numpy as np
import torch
from literal_baselines import literal_rise, literal_rise_mask
from nets import TinyClassifier
from skimage.transform import resize

from fame.explain.rise import bilinear_matrix, draw_rise_grids, rise_maps, upsample_rise_masks


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_bilinear_matrix_is_the_papers_skimage_resize():
    grid = (np.random.default_rng(0).random((5, 4)) < 0.5).astype(np.float64)
    for out in [(18, 16), (24, 20), (7, 9)]:
        expected = resize(grid, out, order=1, mode="reflect", anti_aliasing=False)
        mine = (
            bilinear_matrix(5, out[0], dtype=torch.float64)
            @ torch.from_numpy(grid)
            @ bilinear_matrix(4, out[1], dtype=torch.float64).T
        )
        np.testing.assert_allclose(mine.numpy(), expected, atol=1e-12)


def test_masks_match_literal_masks_and_are_smooth_in_zero_one():
    grids, shifts = draw_rise_grids(6, 3, 0.5, (11, 13), generator())
    assert grids.shape == (6, 3, 3) and shifts.shape == (6, 2)
    assert shifts[:, 0].max() < 4 and shifts[:, 1].max() < 5  # ceil(11 / 3), ceil(13 / 3)
    masks = upsample_rise_masks(grids.double(), shifts, (11, 13))
    assert masks.shape == (6, 1, 11, 13) and masks.min() >= 0 and masks.max() <= 1
    for i in range(6):
        np.testing.assert_allclose(
            masks[i, 0].numpy(), literal_rise_mask(grids[i].double().numpy(), shifts[i].numpy(), (11, 13)), atol=1e-12
        )


def test_rise_equals_literal_per_mask_loop():
    model = TinyClassifier()
    images = torch.rand(2, 3, 12, 12, generator=generator(1)).double()
    model.double()
    maps = rise_maps(
        model,
        images,
        [1, 3],
        masks=12,
        grid_size=3,
        probability=0.5,
        batch_size=5,
        normalization="none",
        generator=generator(2),
    )
    grids, shifts = draw_rise_grids(12, 3, 0.5, (12, 12), generator(2))
    expected = literal_rise(model, images, [1, 3], grids.double(), shifts, 0.5)
    np.testing.assert_allclose(maps[:, 0].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_batched_equals_one_at_a_time_and_model_is_left_alone():
    model = TinyClassifier().train()
    images = torch.rand(3, 3, 12, 12, generator=generator(3))
    with torch.inference_mode():
        batched = rise_maps(model, images, [0, 1, 4], masks=16, grid_size=4, batch_size=7, generator=generator(5))
    single = torch.cat(
        [
            rise_maps(model, images[b : b + 1], [t], masks=16, grid_size=4, batch_size=64, generator=generator(5))
            for b, t in enumerate([0, 1, 4])
        ]
    )
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert batched.shape == (3, 1, 12, 12) and batched.min() >= 0 and batched.max() <= 1
    assert all(m.training for m in model.modules()) and all(
        p.grad is None and p.requires_grad for p in model.parameters()
    )


class RegionClassifier(torch.nn.Module):
    """Logits (0, 8 * mean of rows 2-5, cols 7-10): class 1 rests on that region only."""

    def forward(self, x):
        region = x[:, :, 2:6, 7:11].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(region), 8 * region], dim=1)


def test_rise_finds_the_region_the_class_rests_on():
    images = torch.rand(2, 3, 12, 12, generator=generator(6)) + 0.2
    maps = rise_maps(RegionClassifier(), images, [1, 1], masks=300, grid_size=4, generator=generator(7))[:, 0]
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[2:6, 7:11] = True
    assert inside.flatten()[maps.flatten(1).argmax(dim=1)].all()
    assert (maps[:, inside].mean(dim=1) > maps[:, ~inside].mean(dim=1) + 0.3).all()
