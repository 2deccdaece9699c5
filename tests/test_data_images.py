"""Shared decoding, the torchvision resize/crop geometry, and skipping corrupt samples."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from fame.data.images import (
    CorruptSampleError,
    ResizeCrop,
    SkipCorruptDataset,
    center_crop_offset,
    decode_image,
    read_image,
    resized_size,
    to_float_tensor,
)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("width", [7, 10, 13, 31])
@pytest.mark.parametrize("height", [7, 9, 16, 29])
def test_resize_and_crop_geometry_equals_torchvision(width, height):
    image = noise_image(width, height)
    for resize, crop in [(11, 8), (11, 11), (8, 12), (17, 16)]:
        expected = T.CenterCrop(crop)(T.Resize(resize)(image))
        assert T.Resize(resize)(image).size == resized_size(width, height, resize)
        ours = ResizeCrop(resize, crop).image(image)
        assert ours.size == expected.size == (crop, crop)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))


def test_center_crop_offset_rounding():
    # torchvision: int(round((size - crop) / 2)) (Python rounds halves to even), padding when smaller.
    assert center_crop_offset(57, 32) == 12  # 12.5 -> 12
    assert center_crop_offset(59, 32) == 14  # 13.5 -> 14
    assert center_crop_offset(256, 224) == 16
    assert center_crop_offset(5, 8) == -1  # padded by (8 - 5) // 2 = 1 on the left
    assert resized_size(500, 375, 232) == (309, 232)  # int(232 * 500 / 375) = int(309.33)
    assert resized_size(375, 500, 232) == (232, 309)


def test_box_mapping_exact_values():
    transform = ResizeCrop(36, 32)
    # 64 x 40 landscape: resized to (57, 36); scales 57/64 and 0.9; offsets left 12, top 2.
    boxes = transform.boxes(torch.tensor([[16.0, 10.0, 48.0, 30.0], [0.0, 0.0, 64.0, 40.0]]), 64, 40)
    expected = torch.tensor([[16 * 57 / 64 - 12, 10 * 0.9 - 2, 48 * 57 / 64 - 12, 30 * 0.9 - 2], [0, 0, 32, 32]])
    torch.testing.assert_close(boxes, expected)


def test_decode_errors_name_the_source(tmp_path):
    data = jpeg_bytes(noise_image(40, 30))
    with pytest.raises(CorruptSampleError, match=r"record 7 of x\.rec: cannot decode"):
        decode_image(data[: len(data) // 2], "record 7 of x.rec")
    with pytest.raises(CorruptSampleError, match="empty image data"):
        decode_image(b"", "somewhere")
    path = tmp_path / "broken.jpg"
    path.write_bytes(data[:100])
    with pytest.raises(CorruptSampleError, match="broken.jpg"):
        read_image(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_decode_gray_and_palette_give_rgb():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), "gray")
    assert decoded.mode == "RGB"
    tensor = to_float_tensor(decoded)
    assert tensor.shape == (3, 3, 4) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[1], torch.arange(12, dtype=torch.float32).reshape(3, 4) / 255)


class Numbers(SkipCorruptDataset):
    """Five samples; the ones listed in ``corrupt`` fail to decode."""

    def __init__(self, corrupt: set[int], skip_corrupt: bool) -> None:
        super().__init__(skip_corrupt)
        self.corrupt = corrupt

    def __len__(self) -> int:
        return 5

    def load(self, index: int) -> int:
        if index in self.corrupt:
            raise CorruptSampleError(f"sample {index} is broken")
        return index


def test_skip_corrupt_substitutes_the_next_readable_sample_and_counts():
    strict = Numbers({1, 2}, skip_corrupt=False)
    assert strict[0] == 0
    with pytest.raises(CorruptSampleError, match="sample 1"):
        strict[1]
    tolerant = Numbers({1, 2, 4}, skip_corrupt=True)
    assert [tolerant[i] for i in range(5)] == [0, 3, 3, 3, 0]
    assert tolerant.skipped == 3
    assert tolerant[-1] == 0
    with pytest.raises(IndexError):
        tolerant[5]
    with pytest.raises(CorruptSampleError, match="all 5 samples"):
        Numbers(set(range(5)), skip_corrupt=True)[0]
