"""ImageNet validation: synset mapping, LOC_val_solution.csv / VOC XML boxes, protocol subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fame.data import ImageNetValidation, build_imagenet_subset
from fame.data.imagenet import read_protocol, write_protocol
from fame.data.images import CorruptSampleError

SYNSETS = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "n01484850 great white shark"]


def write_mapping(path: Path, lines=SYNSETS) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def rectangle_image(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Black image with the pixels [xmin, xmax) x [ymin, ymax) white."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    return pixels


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if path.suffix == ".JPEG":
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path)


def write_solution_csv(path: Path, rows: dict[str, list[tuple[str, tuple[int, ...]]]]) -> Path:
    lines = ["ImageId,PredictionString"]
    for image_id, objects in rows.items():
        lines.append(f"{image_id}," + " ".join(f"{wnid} {' '.join(map(str, box))}" for wnid, box in objects) + " ")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_voc(folder: Path, image_id: str, width: int, height: int, objects) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    parts = [
        f"<annotation><folder>val</folder><filename>{image_id}</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    ]
    for wnid, (x0, y0, x1, y1) in objects:
        parts.append(
            f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    (folder / f"{image_id}.xml").write_text("".join(parts))


def bright_box(image: torch.Tensor) -> torch.Tensor:
    """xyxy pixel-edge box around the pixels brighter than one half."""
    ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


# Landscape and portrait, JPEG and PNG; the boxes sit so that one of them is cut by the crop.
CASES = {
    "ILSVRC2012_val_00000001": (64, 40, (16, 10, 48, 30), "n01443537", ".JPEG"),
    "ILSVRC2012_val_00000002": (40, 64, (6, 4, 30, 20), "n01484850", ".png"),
    "ILSVRC2012_val_00000003": (50, 70, (10, 30, 40, 66), "n01440764", ".JPEG"),
}


@pytest.fixture
def imagenet(tmp_path):
    images = tmp_path / "val"
    rows = {}
    for image_id, (width, height, box, wnid, extension) in CASES.items():
        write_image(images / f"{image_id}{extension}", rectangle_image(width, height, box))
        rows[image_id] = [(wnid, box)]
        write_voc(tmp_path / "xml", image_id, width, height, [(wnid, box)])
    return (
        images,
        write_mapping(tmp_path / "LOC_synset_mapping.txt"),
        write_solution_csv(tmp_path / "LOC_val_solution.csv", rows),
    )


@pytest.mark.parametrize("annotation_kind", ["csv", "xml"])
def test_boxes_land_on_the_drawn_rectangle(imagenet, annotation_kind):
    images, mapping, solution = imagenet
    annotations = solution if annotation_kind == "csv" else solution.parent / "xml"
    dataset = ImageNetValidation(images, mapping, annotations, resize=36, crop=32)
    assert len(dataset) == 3
    labels = {"n01440764": 0, "n01443537": 1, "n01484850": 2}
    for item, (image_id, (_width, _height, _box, wnid, _)) in zip(dataset, CASES.items()):
        assert item["id"] == image_id and item["label"] == labels[wnid]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["boxes"].shape == (1, 4)
        assert torch.all((bright_box(item["image"]) - item["boxes"][0]).abs() <= 1.0), (image_id, item["boxes"])


def test_box_values_follow_the_torchvision_geometry(imagenet):
    images, mapping, solution = imagenet
    boxes = {item["id"]: item["boxes"][0] for item in ImageNetValidation(images, mapping, solution, resize=36, crop=32)}
    # 64x40 -> (57, 36), left round(12.5) = 12, top 2.
    torch.testing.assert_close(
        boxes["ILSVRC2012_val_00000001"], torch.tensor([16 * 57 / 64 - 12, 7.0, 48 * 57 / 64 - 12, 25.0])
    )
    # 40x64 -> (36, 57), left 2, top 12; the box top is cut by the crop.
    torch.testing.assert_close(boxes["ILSVRC2012_val_00000002"], torch.tensor([3.4, 0.0, 25.0, 20 * 57 / 64 - 12]))
    # 50x70 -> (36, int(50.4) = 50), left 2, top 9; the box bottom is cut by the crop.
    torch.testing.assert_close(
        boxes["ILSVRC2012_val_00000003"], torch.tensor([36 / 5 - 2, 30 * 50 / 70 - 9, 26.8, 32.0])
    )


def test_default_preprocessing_is_232_then_224(tmp_path):
    image_id = "ILSVRC2012_val_00000009"
    write_image(tmp_path / "val" / "n01440764" / f"{image_id}.JPEG", rectangle_image(300, 250, (100, 50, 200, 200)))
    solution = write_solution_csv(
        tmp_path / "s.csv", {image_id: [("n01440764", (100, 50, 200, 200)), ("n01440764", (0, 0, 10, 10))]}
    )
    item = ImageNetValidation(tmp_path / "val", write_mapping(tmp_path / "m.txt"), solution)[0]
    assert item["image"].shape == (3, 224, 224)
    scale_x, scale_y = 278 / 300, 232 / 250  # int(232 * 300 / 250) = 278
    left, top = 27, 4  # round(54 / 2), round(8 / 2)
    expected = torch.tensor(
        [[100 * scale_x - left, 50 * scale_y - top, 200 * scale_x - left, 200 * scale_y - top], [0, 0, 0, 5.28]]
    )
    torch.testing.assert_close(item["boxes"], expected)
    assert torch.all((bright_box(item["image"]) - item["boxes"][0]).abs() <= 1.0)


def test_label_is_the_line_index_of_the_full_mapping(tmp_path):
    mapping = write_mapping(
        tmp_path / "LOC_synset_mapping.txt", [f"n{index:08d} class {index}, other name" for index in range(1000)]
    )
    write_image(tmp_path / "val" / "a.png", rectangle_image(8, 8, (1, 1, 4, 4)))
    solution = write_solution_csv(tmp_path / "s.csv", {"a": [("n00000999", (1, 1, 4, 4))]})
    dataset = ImageNetValidation(tmp_path / "val", mapping, solution, resize=None, crop=None)
    assert dataset[0]["label"] == 999 and dataset.synsets[999].names == "class 999, other name"
    torch.testing.assert_close(dataset[0]["boxes"], torch.tensor([[1.0, 1.0, 4.0, 4.0]]))
    assert dataset[0]["image"].shape == (3, 8, 8)


def synthetic_solution(tmp_path, per_label: int) -> Path:
    rows = {
        f"ILSVRC2012_val_{label * 100 + i:08d}": [(SYNSETS[label].split()[0], (0, 0, 4, 4))]
        for label in range(3)
        for i in range(per_label)
    }
    return write_solution_csv(tmp_path / "LOC_val_solution.csv", rows)


def test_subset_is_deterministic_per_class_and_round_trips(tmp_path):
    solution, mapping = synthetic_solution(tmp_path, per_label=12), write_mapping(tmp_path / "m.txt")
    subset = build_imagenet_subset(solution, mapping, per_class=5, seed=0)
    assert subset == build_imagenet_subset(solution, mapping, per_class=5, seed=0)
    assert len(subset) == 15 and len(set(subset)) == 15
    assert [int(image_id[-8:]) // 100 for image_id in subset] == [0] * 5 + [1] * 5 + [2] * 5
    assert subset != build_imagenet_subset(solution, mapping, per_class=5, seed=1)
    assert set(build_imagenet_subset(solution, mapping, per_class=20)) == {
        f"ILSVRC2012_val_{label * 100 + i:08d}" for label in range(3) for i in range(12)
    }
    protocol = tmp_path / "protocol.txt"
    write_protocol(protocol, subset)
    assert protocol.read_text().splitlines() == subset
    assert read_protocol(protocol) == subset


def test_protocol_file_selects_and_orders_the_items(imagenet, tmp_path):
    images, mapping, solution = imagenet
    protocol = tmp_path / "protocol.txt"
    write_protocol(protocol, ["ILSVRC2012_val_00000003", "ILSVRC2012_val_00000001"])
    dataset = ImageNetValidation(images, mapping, solution, resize=36, crop=32, ids=protocol)
    assert [item["id"] for item in dataset] == ["ILSVRC2012_val_00000003", "ILSVRC2012_val_00000001"]
    (tmp_path / "twice.txt").write_text("a\n\na\n")
    with pytest.raises(ValueError, match=r"twice.txt, line 3: ImageId a is listed twice"):
        read_protocol(tmp_path / "twice.txt")
    with pytest.raises(ValueError, match="no annotation"):
        ImageNetValidation(images, mapping, solution, ids=["ILSVRC2012_val_00000099"])


def test_format_errors_name_the_file_and_what_was_expected(imagenet, tmp_path):
    images, mapping, solution = imagenet
    (tmp_path / "bad.csv").write_text("Image,Boxes\nx,n01440764 1 2 3 4\n")
    with pytest.raises(
        ValueError, match=r"bad.csv: expected the columns ImageId,PredictionString.*found \['Image', 'Boxes'\]"
    ):
        ImageNetValidation(images, mapping, tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("ImageId,PredictionString\nx,n01440764 1 2 3\n")
    with pytest.raises(ValueError, match=r"short.csv, row 2: .*multiple of 5"):
        ImageNetValidation(images, mapping, tmp_path / "short.csv")
    (tmp_path / "m.txt").write_text("n01440764 tench\ngoldfish n01443537\n")
    with pytest.raises(ValueError, match=r"m.txt, line 2: expected 'nXXXXXXXX name"):
        ImageNetValidation(images, tmp_path / "m.txt", solution)
    write_voc(tmp_path / "xml2", "x", 4, 4, [("n09999999", (0, 0, 1, 1))])
    with pytest.raises(ValueError, match=r"x.xml: synset n09999999 is not in"):
        ImageNetValidation(images, mapping, tmp_path / "xml2")
    (images / "ILSVRC2012_val_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 images not found.*ILSVRC2012_val_00000002"):
        ImageNetValidation(images, mapping, solution)


def test_corrupt_image_fails_or_is_skipped(imagenet):
    images, mapping, solution = imagenet
    path = images / "ILSVRC2012_val_00000001.JPEG"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        CorruptSampleError, match=r"ILSVRC2012_val_00000001.JPEG \(ImageId ILSVRC2012_val_00000001\): cannot decode"
    ):
        ImageNetValidation(images, mapping, solution)[0]
    dataset = ImageNetValidation(images, mapping, solution, resize=36, crop=32, skip_corrupt=True)
    assert [item["id"] for item in dataset] == [
        "ILSVRC2012_val_00000002",
        "ILSVRC2012_val_00000002",
        "ILSVRC2012_val_00000003",
    ]
    assert dataset.skipped == 1
