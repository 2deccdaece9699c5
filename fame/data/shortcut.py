"""Synthetic shapes with a class-coded watermark: a shortcut a classifier can learn instead of the shape.

Each image is the :class:`~fame.data.ShapesDataset` image of the same ``(seed, index)`` with a
small square watermark stamped in one corner. The watermark codes a class (a colour from
:data:`WATERMARK_COLOURS` in a checkerboard with white). With probability ``strength`` it codes
the sample's label; otherwise it codes a class drawn uniformly at random, so

    P(watermark class = label) = strength + (1 - strength) / num_classes

and ``strength = 0`` gives a watermark independent of the label (the validation and test
setting), ``strength = 1`` a watermark that always names the label (a perfect shortcut). Items
keep the ShapesDataset keys (``mask`` is the object's pixels not covered by the watermark) and
add ``watermark_mask`` (the watermark's pixels) and ``watermark`` (the class it codes).
Sample ``i`` is a pure function of ``(seed, i, strength)``: no global random state.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from .shapes import ShapesDataset

#: RGB colour of the watermark of class k (uint8), far apart from each other.
WATERMARK_COLOURS = np.array(
    [[255, 0, 0], [0, 200, 0], [0, 80, 255], [255, 220, 0], [255, 0, 255], [0, 230, 230]], dtype=np.uint8
)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
#: Distance in pixels between the watermark and the image border.
WATERMARK_INSET = 2
#: Tag mixed into the watermark's random stream so it is independent of the rendered image's.
WATERMARK_STREAM = 0x5C07


def watermark_pattern(label: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 pattern of class ``label``: its colour in a 2-px checkerboard with white."""
    rows, cols = np.indices((size, size))
    colour_cells = ((rows // 2 + cols // 2) % 2 == 0)[..., None]
    return np.where(colour_cells, WATERMARK_COLOURS[label], np.uint8(255)).astype(np.uint8)


def watermark_box(corner: str, image_size: int, size: int) -> Tuple[int, int]:
    """(top, left) of a ``size`` px watermark in ``corner`` of an ``image_size`` px image."""
    far = image_size - WATERMARK_INSET - size
    top = WATERMARK_INSET if corner.startswith("top") else far
    left = WATERMARK_INSET if corner.endswith("left") else far
    return top, left


def watermark_class(seed: int, index: int, label: int, strength: float, num_classes: int) -> int:
    """The class sample ``index``'s watermark codes: ``label`` with probability ``strength``, else uniform."""
    rng = np.random.default_rng([seed, index, WATERMARK_STREAM])
    follows_label = rng.random() < strength
    uniform = int(rng.integers(num_classes))
    return int(label) if follows_label else uniform


class ShortcutShapesDataset(ShapesDataset):
    """Shapes with a class-coded corner watermark: ``[i] -> {"image", "label", "mask", "id",
    "watermark_mask", "watermark"}``.

    strength:        probability that the watermark codes the label (else a uniformly random
                     class); use e.g. 0.9 for training and 0 for validation and test.
    watermark_size:  side of the square watermark in pixels (6).
    corner:          one of ``top_left``, ``top_right``, ``bottom_left``, ``bottom_right``.

    ``id`` is ``"shortcut-<seed>-<i>"``; ``watermark_mask`` is float32 (1, H, W).
    """

    def __init__(
        self,
        length: int,
        image_size: int = 64,
        seed: int = 0,
        num_classes: int = 4,
        strength: float = 0.9,
        watermark_size: int = 6,
        corner: str = "top_left",
    ):
        super().__init__(length, image_size=image_size, seed=seed, num_classes=num_classes)
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength is a probability and must be in [0, 1], got {strength}")
        if corner not in CORNERS:
            raise ValueError(f"unknown corner {corner!r}; choose one of {', '.join(CORNERS)}")
        if not 2 <= int(watermark_size) <= image_size // 4:
            raise ValueError(
                f"watermark_size must be between 2 and a quarter of image_size ({image_size // 4} px), "
                f"got {watermark_size}"
            )
        self.strength = float(strength)
        self.watermark_size = int(watermark_size)
        self.corner = corner
        top, left = watermark_box(corner, self.image_size, self.watermark_size)
        self._watermark_mask = torch.zeros(1, self.image_size, self.image_size)
        self._watermark_mask[:, top : top + self.watermark_size, left : left + self.watermark_size] = 1.0
        self._box = (slice(top, top + self.watermark_size), slice(left, left + self.watermark_size))

    def __getitem__(self, index: int) -> Dict[str, object]:
        item = super().__getitem__(index)
        index = index % self.length
        code = watermark_class(self.seed, index, item["label"], self.strength, self.num_classes)
        pattern = torch.from_numpy(watermark_pattern(code, self.watermark_size)).permute(2, 0, 1).float() / 255.0
        item["image"][(slice(None), *self._box)] = pattern
        item["mask"] = item["mask"] * (1.0 - self._watermark_mask)
        item["watermark_mask"] = self._watermark_mask.clone()
        item["watermark"] = code
        item["id"] = f"shortcut-{self.seed}-{index}"
        return item
