"""Overlays and the example grid of maps per method."""

import numpy as np
import torch
from PIL import Image

from fame.viz import overlay, save_overlay_grid


def test_overlay_blends_the_jet_colour_of_the_map_over_the_image():
    image = torch.ones(3, 4, 4)
    attribution = torch.zeros(1, 4, 4)
    attribution[0, 0, 0] = 1.0
    blended = overlay(image, attribution, alpha=0.5)
    assert blended.shape == (4, 4, 3)
    np.testing.assert_allclose(blended[1, 1], 0.5 + 0.5 * np.array([0.0, 0.0, 0.5]), atol=1e-6)  # jet(0): dark blue
    np.testing.assert_allclose(blended[0, 0], 0.5 + 0.5 * np.array([0.5, 0.0, 0.0]), atol=1e-6)  # jet(1): dark red


def test_overlay_accepts_gray_and_channels_last_arrays():
    assert overlay(np.zeros((5, 6)), np.zeros((5, 6))).shape == (5, 6, 3)
    assert overlay(np.zeros((5, 6, 3)), torch.zeros(1, 1, 5, 6)).shape == (5, 6, 3)


def test_grid_has_one_row_per_image_and_one_column_per_method(tmp_path):
    images = [torch.rand(3, 16, 16) for _ in range(3)]
    maps = {name: torch.rand(3, 1, 16, 16) for name in ("fame", "gradcam")}
    masks = [torch.zeros(1, 16, 16) for _ in range(3)]
    for mask in masks:
        mask[0, 4:12, 4:12] = 1
    one = save_overlay_grid(images[:1], {"fame": maps["fame"][:1]}, tmp_path / "one.png")
    full = save_overlay_grid(images, maps, tmp_path / "grid" / "full.png", row_titles=["a", "b", "c"], masks=masks)
    with Image.open(one) as small, Image.open(full) as large:
        assert large.size[0] > small.size[0] * 1.3 and large.size[1] > small.size[1] * 2.5
