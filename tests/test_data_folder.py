"""Generic class folders (with box CSV or mask folder side files) and identity folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fame.data import IdentityFolderDataset, ImageFolderDataset
from fame.data.images import CorruptSampleError


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def rectangle(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    pixels = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return pixels


def bright_box(image: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


BOXES = {
    "dog/b.png": (30, 40, (4, 16, 24, 28)),
    "cat/a.jpg": (40, 30, (4, 6, 20, 18)),
    "cat/sub/c.png": (40, 60, (6, 20, 30, 58)),
}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for name, (width, height, box) in BOXES.items():
        gray = rectangle(width, height, box)
        save(root / name, np.repeat(gray[:, :, None], 3, axis=2))
        save(tmp_path / "masks" / Path(name).with_suffix(".png"), gray)
    (root / "cat" / "notes.txt").write_text("not an image")
    rows = [f"{name},{','.join(map(str, box))}" for name, (_, _, box) in BOXES.items()]
    (tmp_path / "boxes.csv").write_text("path,xmin,ymin,xmax,ymax\n" + "\n".join(rows) + "\n")
    return root


def test_classes_are_sorted_subfolders_and_ids_relative_paths(folder):
    dataset = ImageFolderDataset(folder)
    assert dataset.classes == ["cat", "dog"]
    assert [(item["id"], item["label"]) for item in dataset] == [
        ("cat/a.jpg", 0),
        ("cat/sub/c.png", 0),
        ("dog/b.png", 1),
    ]
    assert dataset[2]["image"].shape == (3, 40, 30)
    assert set(dataset[0]) == {"image", "label", "id"}


def test_boxes_follow_the_resize_and_crop(folder, tmp_path):
    dataset = ImageFolderDataset(folder, size=20, side_file=tmp_path / "boxes.csv")
    for item in dataset:
        assert item["image"].shape == (3, 20, 20) and item["boxes"].shape == (1, 4)
        assert torch.all((bright_box(item["image"]) - item["boxes"][0]).abs() <= 1.0), item["id"]
    # dog/b.png 30x40 -> (20, int(26.67) = 26), scales 2/3 and 0.65, offsets 0 and 3.
    torch.testing.assert_close(dataset[2]["boxes"][0], torch.tensor([4 * 2 / 3, 16 * 0.65 - 3, 16.0, 28 * 0.65 - 3]))
    # cat/sub/c.png 40x60 -> (20, 30), scale 0.5, offsets 0 and 5; y1 = 58 * 0.5 - 5 = 24 is clipped to 20.
    torch.testing.assert_close(dataset[1]["boxes"][0], torch.tensor([3.0, 5.0, 15.0, 20.0]))


def test_masks_follow_the_resize_and_crop(folder, tmp_path):
    dataset = ImageFolderDataset(folder, size=24, crop=16, side_file=tmp_path / "masks")
    for item in dataset:
        assert item["mask"].shape == (1, 16, 16)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        agreement = ((item["mask"][0] > 0.5) == (item["image"].mean(0) > 0.5)).float().mean()
        assert agreement > 0.95, item["id"]
    (tmp_path / "masks" / "dog" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks: no mask for image dog/b.png; expected .*dog/b.png or"):
        dataset[2]


def test_side_file_errors(folder, tmp_path):
    (tmp_path / "cols.csv").write_text("file,x0,y0,x1,y1\ncat/a.jpg,1,2,3,4\n")
    with pytest.raises(ValueError, match=r"cols.csv: expected the columns path,xmin,ymin,xmax,ymax, found \['file'"):
        ImageFolderDataset(folder, side_file=tmp_path / "cols.csv")
    (tmp_path / "order.csv").write_text("path,xmin,ymin,xmax,ymax\ncat/a.jpg,5,2,3,4\n")
    with pytest.raises(ValueError, match=r"order.csv, row 2: expected xmin <= xmax"):
        ImageFolderDataset(folder, side_file=tmp_path / "order.csv")
    (tmp_path / "other.csv").write_text("path,xmin,ymin,xmax,ymax\ncat/zzz.jpg,1,2,3,4\n")
    with pytest.raises(ValueError, match=r"other.csv: boxes given for images not in .*cat/zzz.jpg"):
        ImageFolderDataset(folder, side_file=tmp_path / "other.csv")
    (tmp_path / "partial.csv").write_text("path,xmin,ymin,xmax,ymax\ncat/a.jpg,1,2,3,4\ncat/a.jpg,0,0,1,1\n")
    dataset = ImageFolderDataset(folder, side_file=tmp_path / "partial.csv")
    assert dataset[0]["boxes"].tolist() == [[1, 2, 3, 4], [0, 0, 1, 1]] and dataset[2]["boxes"].shape == (0, 4)


def test_corrupt_class_image_fails_or_is_skipped(folder):
    (folder / "cat" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(CorruptSampleError, match=r"cat/a.jpg: cannot decode"):
        ImageFolderDataset(folder)[0]
    dataset = ImageFolderDataset(folder, skip_corrupt=True)
    assert [item["id"] for item in dataset] == ["cat/sub/c.png", "cat/sub/c.png", "dog/b.png"] and dataset.skipped == 1


def test_identity_folders(tmp_path):
    pixels = {
        name: np.random.default_rng(seed).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
        for seed, name in enumerate(["id_b/2.png", "id_b/1.png", "id_a/x.png", "id_c/deep/y.png"])
    }
    for name, image in pixels.items():
        save(tmp_path / name, image)
    (tmp_path / "empty_folder").mkdir()
    dataset = IdentityFolderDataset(tmp_path)
    assert dataset.identities == ["empty_folder", "id_a", "id_b", "id_c"] and dataset.num_classes == 4
    expected = [("id_a/x.png", 1), ("id_b/1.png", 2), ("id_b/2.png", 2), ("id_c/deep/y.png", 3)]
    assert len(dataset) == 4
    for (image, label), (name, expected_label) in zip(dataset, expected):
        assert image.dtype == np.uint8 and label == expected_label
        np.testing.assert_array_equal(image, pixels[name])
    (tmp_path / "id_b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(CorruptSampleError, match=r"id_b/1.png: cannot decode the image"):
        dataset[1]
    tolerant = IdentityFolderDataset(tmp_path, skip_corrupt=True)
    assert [label for _, label in tolerant] == [1, 2, 2, 3] and tolerant.skipped == 1
    with pytest.raises(FileNotFoundError, match="no images found"):
        IdentityFolderDataset(tmp_path / "empty_folder")
