"""Shared image decoding, the resize + centre-crop geometry, and skipping of corrupt samples.

Every loader in ``fame.data`` decodes through :func:`decode_image` / :func:`read_image`, so an
unreadable or truncated file always raises :class:`CorruptSampleError` naming where it came from.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class CorruptSampleError(ValueError):
    """A sample whose bytes cannot be read as what the format promises (image or record)."""


def _decode(handle: Any, source: str) -> Image.Image:
    try:
        with Image.open(handle) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptSampleError(
            f"{source}: cannot decode the image ({error}); expected a complete encoded image "
            "(JPEG, PNG, ...). Replace the file, or pass skip_corrupt=True to skip such samples."
        ) from error


def decode_image(data: bytes | bytearray | memoryview, source: str) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) into a fully loaded RGB PIL image.

    ``source`` says where the bytes came from (file and record) and is part of any error message.
    """
    if len(data) == 0:
        raise CorruptSampleError(f"{source}: empty image data; expected an encoded JPEG/PNG image.")
    return _decode(io.BytesIO(bytes(data)), source)


def read_image(path: str | Path, source: str | None = None) -> Image.Image:
    """Read an image file into a fully loaded RGB PIL image (truncated files are errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source or path}: image file {path} does not exist.")
    return _decode(path, source or str(path))


def to_uint8_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 array (H, W, 3)."""
    return np.array(image, dtype=np.uint8)


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """RGB (or single-channel) PIL image -> float32 tensor (C, H, W) in [0, 1]."""
    return TF.pil_to_tensor(image).float().div_(255.0)


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """(new_width, new_height) after resizing the shorter side to ``shorter_side``.

    Same rounding as torchvision's ``Resize(int)``: the short side becomes exactly
    ``shorter_side`` and the long side is ``int(shorter_side * long / short)`` (truncated).
    """
    if width <= height:
        return shorter_side, int(shorter_side * height / width)
    return int(shorter_side * width / height), shorter_side


def center_crop_offset(size: int, crop: int) -> int:
    """Offset of a centre crop along one axis, as torchvision's ``center_crop`` computes it.

    ``int(round((size - crop) / 2))`` when the image is large enough; otherwise torchvision
    zero-pads ``(crop - size) // 2`` before the crop, which is a negative offset.
    """
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


@dataclass(frozen=True)
class Geometry:
    """Where the pixels of one source image go: x' = x * scale_x - left, y' = y * scale_y - top."""

    resized_width: int
    resized_height: int
    scale_x: float
    scale_y: float
    left: int
    top: int
    out_width: int
    out_height: int


@dataclass(frozen=True)
class ResizeCrop:
    """Resize the shorter side to ``resize`` (keeping the aspect ratio), then centre crop ``crop``.

    Either step may be ``None``. Images, masks and boxes all go through the same
    :class:`Geometry`, so boxes land on the pixels they annotate. Each axis scales by
    new_size / old_size, which is ``resize / short`` on both axes up to torchvision's
    truncation of the long side (less than one pixel).
    """

    resize: int | None = None
    crop: int | None = None

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")

    def geometry(self, width: int, height: int) -> Geometry:
        new_width, new_height = (width, height) if self.resize is None else resized_size(width, height, self.resize)
        if self.crop is None:
            left = top = 0
            out_width, out_height = new_width, new_height
        else:
            left, top = center_crop_offset(new_width, self.crop), center_crop_offset(new_height, self.crop)
            out_width = out_height = self.crop
        return Geometry(new_width, new_height, new_width / width, new_height / height, left, top, out_width, out_height)

    def _apply(self, image: Image.Image, interpolation: TF.InterpolationMode) -> Image.Image:
        geometry = self.geometry(*image.size)
        if (geometry.resized_width, geometry.resized_height) != image.size:
            image = TF.resize(image, [geometry.resized_height, geometry.resized_width], interpolation=interpolation)
        if self.crop is not None:
            image = TF.crop(image, geometry.top, geometry.left, geometry.out_height, geometry.out_width)
        return image

    def image(self, image: Image.Image) -> Image.Image:
        """Transform an image (bilinear with antialiasing, as torchvision's ImageNet presets)."""
        return self._apply(image, TF.InterpolationMode.BILINEAR)

    def mask(self, mask: Image.Image) -> Image.Image:
        """Transform a mask with nearest-neighbour sampling, so mask values stay as they are."""
        return self._apply(mask, TF.InterpolationMode.NEAREST)

    def boxes(self, boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Map boxes (K, 4) xyxy in source pixels to output pixels, clipped to the output."""
        geometry = self.geometry(width, height)
        boxes = boxes.to(torch.float32).reshape(-1, 4)
        scale = torch.tensor([geometry.scale_x, geometry.scale_y] * 2, dtype=torch.float32)
        shift = torch.tensor([geometry.left, geometry.top] * 2, dtype=torch.float32)
        mapped = boxes * scale - shift
        limit = torch.tensor([geometry.out_width, geometry.out_height] * 2, dtype=torch.float32)
        return torch.minimum(mapped.clamp(min=0.0), limit)


class SkipCorruptDataset(Dataset):
    """Map-style dataset whose corrupt samples either raise or are skipped and counted.

    Subclasses implement ``__len__`` and ``load(index)``. With ``skip_corrupt=True`` a sample
    raising :class:`CorruptSampleError` is logged, remembered, and replaced by the next readable
    sample (its own id travels with it, so consumers that de-duplicate by id stay correct).
    ``skipped`` counts the distinct corrupt samples met in this process (each DataLoader worker
    counts its own).
    """

    def __init__(self, skip_corrupt: bool = False) -> None:
        self.skip_corrupt = skip_corrupt
        self.skipped_indices: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self.skipped_indices)

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} is out of range for a dataset of {length} samples.")
        index %= length
        if not self.skip_corrupt:
            return self.load(index)
        for step in range(length):
            candidate = (index + step) % length
            if candidate in self.skipped_indices:
                continue
            try:
                return self.load(candidate)
            except CorruptSampleError as error:
                self.skipped_indices.add(candidate)
                log.warning("skipping corrupt sample %d: %s", candidate, error)
        raise CorruptSampleError(f"all {length} samples of {type(self).__name__} are corrupt.")
