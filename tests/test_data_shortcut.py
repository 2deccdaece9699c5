"""The shortcut variant of the shapes data: watermark correlation per split and determinism."""

import numpy as np
import pytest
import torch

from fame.data import ShapesDataset, ShortcutShapesDataset
from fame.data.shortcut import watermark_pattern


def agreement(dataset) -> float:
    return float(np.mean([dataset[i]["watermark"] == dataset[i]["label"] for i in range(len(dataset))]))


def test_watermark_follows_the_label_with_the_configured_strength():
    train = ShortcutShapesDataset(300, image_size=32, seed=1, strength=0.8)
    val = ShortcutShapesDataset(300, image_size=32, seed=2, strength=0.0)
    # P(match) = strength + (1 - strength) / K; binomial s.d. at n=300 is about 0.025.
    assert abs(agreement(train) - (0.8 + 0.2 / 4)) < 0.08
    assert abs(agreement(val) - 0.25) < 0.08
    assert agreement(ShortcutShapesDataset(60, image_size=32, seed=1, strength=1.0)) == 1.0


def test_items_are_deterministic_and_keep_the_shapes_keys():
    first = ShortcutShapesDataset(5, image_size=32, seed=7, strength=0.5)
    second = ShortcutShapesDataset(5, image_size=32, seed=7, strength=0.5)
    shapes = ShapesDataset(5, image_size=32, seed=7, num_classes=4)
    for index in range(5):
        a, b, plain = first[index], second[index], shapes[index]
        assert set(a) == {"image", "label", "mask", "id", "watermark_mask", "watermark"}
        assert a["id"] == b["id"] == f"shortcut-7-{index}"
        assert a["watermark"] == b["watermark"] and a["label"] == plain["label"]
        for key in ("image", "mask", "watermark_mask"):
            assert torch.equal(a[key], b[key])
        outside = a["watermark_mask"] == 0
        assert torch.equal(a["image"][outside.expand_as(a["image"])], plain["image"][outside.expand_as(plain["image"])])
        assert torch.equal(a["mask"], plain["mask"] * outside.float())
    assert torch.equal(first[2]["image"], first[2]["image"])  # re-reading does not stamp the cache


def test_watermark_pixels_carry_the_class_pattern_in_the_chosen_corner():
    dataset = ShortcutShapesDataset(3, image_size=32, seed=0, strength=1.0, watermark_size=6, corner="bottom_right")
    item = dataset[1]
    mask = item["watermark_mask"][0]
    assert mask.sum() == 36 and mask[-8:-2, -8:-2].all()
    expected = torch.from_numpy(watermark_pattern(item["watermark"], 6)).permute(2, 0, 1).float() / 255
    assert torch.equal(item["image"][:, -8:-2, -8:-2], expected)


@pytest.mark.parametrize("options", [{"strength": 1.5}, {"corner": "centre"}, {"watermark_size": 20}])
def test_invalid_settings_are_refused(options):
    with pytest.raises(ValueError):
        ShortcutShapesDataset(4, image_size=32, **options)
