"""Feature-map experiment: CAM cells, outside-cell mass, the tiled sheet and the per-layer report."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fame.explain import FameConfig
from fame.featuremap import (
    GAP_COLOUR,
    SQUARE_COLOUR,
    cam_cells,
    cell_floor,
    feature_map_sheet,
    layer_report,
    outside_cell_mass,
    outside_mass_by_location,
    subset_grid,
)
from tests.nets import TinyBackbone


def test_cam_cells_tile_the_image_row_major():
    boxes = cam_cells(7, 7, 224, 224)
    assert boxes.shape == (49, 4)
    assert boxes[0].tolist() == [0, 0, 32, 32]
    assert boxes[1].tolist() == [0, 32, 32, 64]  # row-major: the second cell is to the right
    assert boxes[7].tolist() == [32, 0, 64, 32]
    assert boxes[48].tolist() == [192, 192, 224, 224]
    covered = torch.zeros(224, 224, dtype=torch.long)
    for top, left, bottom, right in boxes.tolist():
        covered[top:bottom, left:right] += 1
    assert bool((covered == 1).all())


def test_cam_cells_round_uneven_sizes_and_reject_impossible_grids():
    boxes = cam_cells(4, 3, 10, 10)
    covered = torch.zeros(10, 10, dtype=torch.long)
    for top, left, bottom, right in boxes.tolist():
        covered[top:bottom, left:right] += 1
    assert bool((covered == 1).all())
    with pytest.raises(ValueError, match="cannot split"):
        cam_cells(8, 8, 4, 4)


def test_map_inside_its_cell_has_no_outside_mass_and_uniform_map_has_all_but_one_cell():
    h = w = 7
    boxes = cam_cells(h, w, 28, 28)
    inside = torch.zeros(h * w, 1, 28, 28)
    for index, (top, left, bottom, right) in enumerate(boxes.tolist()):
        inside[index, 0, top + 1 : bottom - 1, left + 1 : right - 1] = torch.rand(bottom - top - 2, right - left - 2)
    assert torch.allclose(outside_cell_mass(inside, h, w), torch.zeros(h * w), atol=1e-6)
    uniform = torch.ones(h * w, 1, 28, 28)
    assert torch.allclose(outside_cell_mass(uniform, h, w), torch.full((h * w,), 1 - 1 / (h * w)), atol=1e-6)


def test_outside_mass_of_a_map_in_another_cell_and_of_an_empty_map():
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, 6, 6] = 1.0  # location (0, 0)'s map lies in cell (1, 1)
    maps[0, 0, 0, 0] = 3.0  # ... and three times as much inside its own cell
    shares = outside_cell_mass(maps, 2, 2, locations=[(0, 0), (1, 1)])
    assert shares[0].item() == pytest.approx(0.25)
    assert math.isnan(shares[1].item())  # no mass, no share


def test_outside_mass_requires_matching_locations():
    with pytest.raises(ValueError, match="2x2 grid"):
        outside_cell_mass(torch.ones(3, 1, 8, 8), 2, 2)
    with pytest.raises(ValueError, match="shape \\(L, 1, H, W\\)"):
        outside_cell_mass(torch.ones(4, 8, 8), 2, 2)


def test_cell_floor_grows_with_blur_and_is_zero_without():
    assert torch.allclose(cell_floor(4, 4, 32, 32, FameConfig(blur_kernel=None)), torch.zeros(16))
    light = cell_floor(4, 4, 32, 32, FameConfig(blur_kernel=5, blur_sigma=1.0))
    heavy = cell_floor(4, 4, 32, 32, FameConfig(blur_kernel=15, blur_sigma=3.0))
    assert bool((light > 0).all()) and bool((heavy > light).all())


def test_sheet_has_49_tiles_with_the_squares_where_they_belong(tmp_path):
    h = w = 7
    size, gap = 28, 2
    image = torch.zeros(3, size, size)  # black image, zero maps: tiles are dark blue, never pure green
    maps = torch.zeros(h * w, 1, size, size)
    path = feature_map_sheet(image, maps, h, w, tmp_path / "sheet.png", gap=gap)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape == (h * size + (h - 1) * gap, w * size + (w - 1) * gap, 3)
    green = np.array(SQUARE_COLOUR) * 255
    white = np.array(GAP_COLOUR) * 255
    boxes = cam_cells(h, w, size, size).tolist()
    tiles = 0
    for row in range(h):
        for col in range(w):
            tile = sheet[row * (size + gap) : row * (size + gap) + size, col * (size + gap) : col * (size + gap) + size]
            top, left, bottom, right = boxes[row * w + col]
            is_green = (tile == green).all(axis=2)
            expected = np.zeros((size, size), dtype=bool)
            expected[top:bottom, left:right] = True
            expected[top + 1 : bottom - 1, left + 1 : right - 1] = False  # a one-pixel outline of the cell
            np.testing.assert_array_equal(is_green, expected, err_msg=f"tile ({row}, {col})")
            tiles += 1
    assert tiles == 49
    assert (sheet[size : size + gap] == white).all()  # the gap below the first row of tiles


def test_sheet_of_a_sub_grid_leaves_other_tiles_blank_and_scales(tmp_path):
    locations = [(0, 0), (1, 1)]
    path = feature_map_sheet(
        torch.rand(3, 8, 8),
        torch.rand(2, 1, 8, 8),
        2,
        2,
        tmp_path / "s.png",
        locations=locations,
        scale=3,
        gap=0,
        line_width=2,
    )
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape == (48, 48, 3)
    assert (sheet[:24, 24:] == 255).all()  # location (0, 1) was not explained: blank
    green = np.array(SQUARE_COLOUR) * 255
    assert (sheet[0:2, 0:12] == green).all()  # (0, 0)'s cell (12 px after scaling), two pixels wide
    assert (sheet[24 + 12 : 24 + 14, 24 + 12 : 48] == green).all()  # (1, 1)'s cell top edge in its tile


def test_subset_grid_spreads_over_the_grid():
    assert subset_grid(7, 7).shape == (49, 2)
    locations = subset_grid(16, 16, max_locations=16)
    assert locations.shape == (16, 2)
    assert sorted(set(locations[:, 0].tolist())) == [0, 5, 10, 15]
    assert subset_grid(4, 4, max_locations=100).shape == (16, 2)


def test_layer_report_on_a_tiny_two_stage_network():
    model = TinyBackbone()
    images = torch.rand(2, 3, 16, 16)
    config = FameConfig(iterations=3, blur_kernel=3, blur_sigma=1.0)
    by_location = outside_mass_by_location(
        model, images, ["stage1", "stage2"], config, max_locations=9, image_ids=["a", "b"]
    )
    # stage1 is 8x8 (sub-grid of 3x3 = 9 locations), stage2 4x4 (all 16 > 9, so 3x3 as well)
    assert by_location.groupby("layer").size().to_dict() == {"stage1": 18, "stage2": 18}
    assert set(by_location["image"]) == {"a", "b"}
    assert by_location["outside_mass"].between(0, 1).all()
    report = layer_report(model, images, ["stage1", "stage2"], config, max_locations=9)
    assert list(report["layer"]) == ["stage1", "stage2"]
    assert list(report["grid"]) == ["8x8", "4x4"]
    assert list(report["locations"]) == [9, 9] and list(report["images"]) == [2, 2]
    assert report["mean"].between(0, 1).all() and report["median"].between(0, 1).all()
    assert report["uniform"].tolist() == pytest.approx([1 - 1 / 64, 1 - 1 / 16])
    # a stage-1 location sees a 7x7 input patch, so its map reaches past its 2x2 cell
    assert report.loc[0, "mean"] > 0.3
