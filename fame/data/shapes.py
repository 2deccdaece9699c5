"""Synthetic "shapes" classification with pixel-exact ground truth.

Each image holds one object whose shape decides the class, at a random position, scale, rotation
and colour, over clutter: a crop of one of scikit-image's bundled photographs, a few distractor
strokes and Gaussian noise. The object's mask is returned with the image, so explanations can be
scored against the evidence the label depends on. Sample ``i`` is a pure function of
``(seed, i)``: no global random state, identical on every machine and worker.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Tuple

import cv2
import numpy as np
import torch
from skimage import data as skdata
from skimage import draw
from torch.utils.data import Dataset

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star", "ring")
BACKGROUND_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "camera",
)
#: Candidate object colours; the one farthest from the local background is drawn.
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [250, 250, 250],
        [10, 10, 10],
    ],
    dtype=np.float32,
)


#: Photos are stored with this shorter side; crops of a quarter to all of it are drawn.
PHOTO_SIDE = 192


@lru_cache(maxsize=1)
def background_photos() -> Tuple[np.ndarray, ...]:
    """scikit-image's bundled photographs as uint8 RGB arrays (gray ones replicated)."""
    photos = []
    for name in BACKGROUND_PHOTOS:
        photo = np.asarray(getattr(skdata, name)())
        if photo.dtype == bool:
            photo = photo.astype(np.uint8) * 255
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        photo = np.ascontiguousarray(photo[..., :3]).astype(np.uint8)
        scale = PHOTO_SIDE / min(photo.shape[:2])
        photos.append(cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    return tuple(photos)


def _regular_polygon(sides: int, radius: float, angle: float, inner: float = 1.0) -> np.ndarray:
    """Vertices (N, 2) as (row, col) offsets; ``inner`` < 1 alternates radii for a star."""
    count = sides * (2 if inner != 1.0 else 1)
    theta = angle + np.arange(count) * 2 * np.pi / count
    radii = np.full(count, radius, dtype=np.float64)
    if inner != 1.0:
        radii[1::2] *= inner
    return np.stack([-radii * np.cos(theta), radii * np.sin(theta)], axis=1)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, -s], [s, c]])


def shape_mask(label: int, size: int, center: Tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of shape class ``label`` centred at (row, col)."""
    mask = np.zeros((size, size), dtype=bool)
    row, col = center
    name = SHAPE_CLASSES[label]
    if name in ("circle", "ring"):
        rr, cc = draw.disk((row, col), radius, shape=mask.shape)
        mask[rr, cc] = True
        if name == "ring":
            rr, cc = draw.disk((row, col), radius * 0.55, shape=mask.shape)
            mask[rr, cc] = False
        return mask
    if name == "square":
        vertices = _regular_polygon(4, radius * 1.05, angle)
    elif name == "triangle":
        vertices = _regular_polygon(3, radius * 1.15, angle)
    elif name == "star":
        vertices = _regular_polygon(5, radius * 1.2, angle, inner=0.45)
    else:  # cross: a plus sign of arm half-width 0.3 r
        w, r = 0.3 * radius, radius
        vertices = np.array(
            [[-r, -w], [-r, w], [-w, w], [-w, r], [w, r], [w, w], [r, w], [r, -w], [w, -w], [w, -r], [-w, -r], [-w, -w]]
        )
        vertices = _rotate(vertices, angle)
    rr, cc = draw.polygon(vertices[:, 0] + row, vertices[:, 1] + col, shape=mask.shape)
    mask[rr, cc] = True
    return mask


def render_shape_sample(seed: int, index: int, image_size: int, num_classes: int) -> Tuple[np.ndarray, int, np.ndarray]:
    """Image (H, W, 3) uint8, label and object mask (H, W) bool of sample ``index``."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(num_classes))
    photos = background_photos()
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    crop = int(rng.integers(min(height, width) // 4, min(height, width) + 1))
    top, left = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
    background = cv2.resize(
        photo[top : top + crop, left : left + crop], (image_size, image_size), interpolation=cv2.INTER_AREA
    ).astype(np.float32)
    if rng.random() < 0.5:
        background = background[:, ::-1]
    background = background * rng.uniform(0.6, 1.2) + rng.uniform(-30, 30, size=3)

    for _ in range(int(rng.integers(1, 4))):  # distractor strokes
        r0, c0, r1, c1 = rng.integers(0, image_size, size=4)
        rr, cc, value = draw.line_aa(int(r0), int(c0), int(r1), int(c1))
        background[rr, cc] = (1 - value[:, None]) * background[rr, cc] + value[:, None] * rng.uniform(0, 255, 3)

    radius = rng.uniform(0.14, 0.24) * image_size
    margin = radius * 1.2
    center = (rng.uniform(margin, image_size - margin), rng.uniform(margin, image_size - margin))
    mask = shape_mask(label, image_size, center, radius, rng.uniform(0, 2 * np.pi))
    local = background[mask].mean(axis=0)
    contrast = np.argsort(np.linalg.norm(PALETTE - local, axis=1))[-3:]  # three most distinct colours
    colour = PALETTE[int(rng.choice(contrast))]
    shading = np.linspace(0.85, 1.1, image_size, dtype=np.float32)[:, None, None]
    image = np.where(mask[..., None], colour * (shading if rng.random() < 0.5 else 1.0), background)
    image = image + rng.normal(0.0, rng.uniform(3, 12), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label, mask


class ShapesDataset(Dataset):
    """Deterministic synthetic shapes: ``[i] -> {"image", "label", "mask", "id"}``.

    image: float32 (3, H, W) in [0, 1]; mask: float32 (1, H, W) of the object's pixels;
    id: ``"shapes-<seed>-<i>"``. Samples are rendered on first access and kept in memory.
    """

    def __init__(self, length: int, image_size: int = 64, seed: int = 0, num_classes: int = len(SHAPE_CLASSES)):
        if not 2 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"num_classes must be between 2 and {len(SHAPE_CLASSES)}, got {num_classes}")
        if image_size < 24:
            raise ValueError(f"image_size must be at least 24 px for the shapes to be legible, got {image_size}")
        self.length = int(length)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.class_names: List[str] = list(SHAPE_CLASSES[:num_classes])
        self._cache: Dict[int, Tuple[np.ndarray, int, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, object]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        index = index % self.length
        if index not in self._cache:
            self._cache[index] = render_shape_sample(self.seed, index, self.image_size, self.num_classes)
        image, label, mask = self._cache[index]
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "label": label,
            "mask": torch.from_numpy(mask).unsqueeze(0).float(),
            "id": f"shapes-{self.seed}-{index}",
        }
