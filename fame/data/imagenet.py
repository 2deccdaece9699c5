"""ImageNet ILSVRC2012 validation images with their class labels and bounding boxes.

Formats (as distributed with the ILSVRC2012 localisation data, README, "Bring your own data and checkpoints"):

- ``LOC_synset_mapping.txt``: one line per class, ``nXXXXXXXX name, other names``; the label of
  a synset is its 0-based line number.
- ``LOC_val_solution.csv``: columns ``ImageId,PredictionString``; the prediction string repeats
  ``synset xmin ymin xmax ymax``.
- or a folder of per-image PASCAL-VOC XML files (``annotation/object/name`` and
  ``annotation/object/bndbox/{xmin,ymin,xmax,ymax}``), named ``<ImageId>.xml``.
- Images ``<ImageId>.JPEG`` anywhere below ``images_root`` (flat, or in per-class folders).
- A protocol file selects a subset: text, one ImageId per line.

Box coordinates are used as continuous pixel coordinates and go through the same resize and
centre crop as the image (:class:`fame.data.images.ResizeCrop`).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fame.data.images import IMAGE_EXTENSIONS, ResizeCrop, SkipCorruptDataset, read_image, to_float_tensor

SYNSET_PATTERN = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Synset:
    wnid: str
    names: str


@dataclass(frozen=True)
class ImageAnnotation:
    """All objects of one image: their synsets and xyxy boxes in source pixels."""

    image_id: str
    synsets: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]
    source: str


def read_synset_mapping(path: str | Path) -> list[Synset]:
    """Read ``LOC_synset_mapping.txt``: line ``i`` is ``nXXXXXXXX names`` of label ``i``."""
    path = Path(path)
    synsets: list[Synset] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            wnid, _, names = line.partition(" ")
            if not SYNSET_PATTERN.match(wnid):
                raise ValueError(
                    f"{path}, line {number}: expected 'nXXXXXXXX name, other names' (a WordNet id "
                    f"such as n01440764 followed by the names), got {line!r}."
                )
            synsets.append(Synset(wnid, names.strip()))
    if not synsets:
        raise ValueError(f"{path}: no synsets found; expected 1000 lines 'nXXXXXXXX name, other names'.")
    seen: dict[str, int] = {}
    for label, synset in enumerate(synsets):
        if synset.wnid in seen:
            raise ValueError(f"{path}: synset {synset.wnid} appears twice (labels {seen[synset.wnid]} and {label}).")
        seen[synset.wnid] = label
    return synsets


def _number(text: str | None, where: str, what: str) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be a number, got {text!r}.") from None


def read_val_solution_csv(path: str | Path) -> dict[str, ImageAnnotation]:
    """Read ``LOC_val_solution.csv`` (``ImageId,PredictionString`` of ``synset x0 y0 x1 y1 ...``)."""
    path = Path(path)
    annotations: dict[str, ImageAnnotation] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        if "ImageId" not in columns or "PredictionString" not in columns:
            raise ValueError(
                f"{path}: expected the columns ImageId,PredictionString of LOC_val_solution.csv, found {columns}."
            )
        reader.fieldnames = columns
        for row_number, row in enumerate(reader, start=2):
            where = f"{path}, row {row_number}"
            image_id = (row["ImageId"] or "").strip()
            fields = (row["PredictionString"] or "").split()
            if not image_id or not fields or len(fields) % 5:
                raise ValueError(
                    f"{where}: expected an ImageId and a PredictionString of 'synset xmin ymin xmax ymax' "
                    f"groups (a multiple of 5 fields), got {row['ImageId']!r}, {row['PredictionString']!r}."
                )
            synsets, boxes = [], []
            for start in range(0, len(fields), 5):
                synsets.append(fields[start])
                boxes.append(
                    tuple(_number(value, where, "a box coordinate") for value in fields[start + 1 : start + 5])
                )
            if image_id in annotations:
                raise ValueError(f"{where}: ImageId {image_id} appears twice.")
            annotations[image_id] = ImageAnnotation(image_id, tuple(synsets), tuple(boxes), where)  # type: ignore[arg-type]
    return annotations


def read_voc_annotation(path: str | Path) -> ImageAnnotation:
    """Read one PASCAL-VOC XML file; the ImageId is the file name without ``.xml``."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: not a readable PASCAL-VOC XML file ({error}).") from error
    synsets, boxes = [], []
    for number, element in enumerate(root.iter("object"), start=1):
        where = f"{path}, object {number}"
        name = element.findtext("name")
        box = element.find("bndbox")
        if not name or box is None:
            raise ValueError(f"{where}: expected <name> and <bndbox> with xmin, ymin, xmax, ymax.")
        synsets.append(name.strip())
        boxes.append(
            tuple(_number(box.findtext(key), where, f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax"))
        )
    return ImageAnnotation(path.stem, tuple(synsets), tuple(boxes), str(path))  # type: ignore[arg-type]


def read_annotations(path: str | Path) -> dict[str, ImageAnnotation]:
    """Read boxes from ``LOC_val_solution.csv`` or from a folder of per-image VOC XML files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.xml"))
        if not files:
            raise FileNotFoundError(f"{path}: no .xml annotation files found (expected <ImageId>.xml per image).")
        annotations: dict[str, ImageAnnotation] = {}
        for file in files:
            annotation = read_voc_annotation(file)
            if annotation.image_id in annotations:
                raise ValueError(
                    f"{file}: ImageId {annotation.image_id} also annotated in "
                    f"{annotations[annotation.image_id].source}."
                )
            annotations[annotation.image_id] = annotation
        return annotations
    if path.is_file():
        return read_val_solution_csv(path)
    raise FileNotFoundError(
        f"{path}: annotations not found; expected LOC_val_solution.csv or a folder of VOC .xml files."
    )


def read_protocol(path: str | Path) -> list[str]:
    """Read a protocol file: one ImageId per line (blank lines ignored)."""
    path = Path(path)
    ids: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            image_id = line.strip()
            if not image_id:
                continue
            if image_id in seen:
                raise ValueError(f"{path}, line {number}: ImageId {image_id} is listed twice.")
            seen.add(image_id)
            ids.append(image_id)
    return ids


def write_protocol(path: str | Path, ids: Sequence[str]) -> None:
    """Write a protocol file: one ImageId per line."""
    Path(path).write_text("".join(f"{image_id}\n" for image_id in ids), encoding="utf-8")


def _selection_key(seed: int, image_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).digest()


def build_imagenet_subset(
    annotations: str | Path, synset_mapping: str | Path, per_class: int = 5, seed: int = 0
) -> list[str]:
    """Pick ``per_class`` images of every class (the paper uses 5), deterministically.

    Within a class, images are ranked by SHA-256 of ``"{seed}:{ImageId}"`` and the first
    ``per_class`` are taken, so the choice depends only on the seed and the ids (not on file
    order, platform or Python version). Classes with fewer images contribute all they have.
    Returns ids ordered by label, then ImageId.
    """
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}.")
    labels = {synset.wnid: label for label, synset in enumerate(read_synset_mapping(synset_mapping))}
    by_label: dict[int, list[str]] = defaultdict(list)
    for annotation in read_annotations(annotations).values():
        by_label[_label_of(annotation, labels, synset_mapping)].append(annotation.image_id)
    subset: list[str] = []
    for label in sorted(by_label):
        chosen = sorted(by_label[label], key=lambda image_id: _selection_key(seed, image_id))[:per_class]
        subset.extend(sorted(chosen))
    return subset


def _label_of(annotation: ImageAnnotation, labels: dict[str, int], synset_mapping: str | Path) -> int:
    if not annotation.synsets:
        raise ValueError(
            f"{annotation.source}: image {annotation.image_id} has no annotated object, so it has no class."
        )
    wnid = annotation.synsets[0]
    if wnid not in labels:
        raise ValueError(f"{annotation.source}: synset {wnid} is not in {synset_mapping}.")
    return labels[wnid]


def index_images(root: str | Path) -> dict[str, Path]:
    """Map file stem (the ImageId) -> path for every image file below ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found.")
    found: dict[str, Path] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            stem, extension = os.path.splitext(name)
            if extension.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(directory, name)
            if stem in found:
                raise ValueError(f"{root}: image {stem} found twice ({found[stem]} and {path}); keep one.")
            found[stem] = path
    return found


class ImageNetValidation(SkipCorruptDataset):
    """ILSVRC2012 validation images: ``[i]`` -> {"image", "label", "boxes", "id"}.

    ``image`` is float (3, crop, crop) in [0, 1] after resizing the shorter side to ``resize``
    and centre cropping ``crop``; ``boxes`` (K, 4) xyxy are the boxes of the image's class in
    output pixels, clipped to the crop; ``id`` is the ImageId. ``ids`` (a list or a protocol
    file) selects a subset in the given order; otherwise all annotated images, sorted.
    """

    def __init__(
        self,
        images_root: str | Path,
        synset_mapping: str | Path,
        annotations: str | Path,
        resize: int | None = 232,
        crop: int | None = 224,
        ids: Sequence[str] | str | Path | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(skip_corrupt)
        self.transform = ResizeCrop(resize, crop)
        self.synsets = read_synset_mapping(synset_mapping)
        labels = {synset.wnid: label for label, synset in enumerate(self.synsets)}
        every_annotation = read_annotations(annotations)
        if ids is None:
            selected = sorted(every_annotation)
        elif isinstance(ids, (str, Path)):
            selected = read_protocol(ids)
        else:
            selected = list(ids)
        unknown = [image_id for image_id in selected if image_id not in every_annotation]
        if unknown:
            raise ValueError(
                f"{len(unknown)} selected ImageIds have no annotation in {annotations} (first: {unknown[:3]}); "
                "the protocol must list ImageIds of the annotated images."
            )
        annotated = []
        for image_id in selected:
            annotation = every_annotation[image_id]
            label = _label_of(annotation, labels, synset_mapping)
            own = [box for wnid, box in zip(annotation.synsets, annotation.boxes) if labels.get(wnid) == label]
            annotated.append((image_id, label, torch.tensor(own, dtype=torch.float32).reshape(-1, 4)))
        paths = index_images(images_root)
        missing = [image_id for image_id in selected if image_id not in paths]
        if missing:
            raise FileNotFoundError(
                f"{images_root}: {len(missing)} images not found (first: {missing[:3]}); expected files "
                "<ImageId>.JPEG below this folder."
            )
        self.samples = [(paths[image_id], label, boxes, image_id) for image_id, label, boxes in annotated]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> dict[str, object]:
        path, label, boxes, image_id = self.samples[index]
        image = read_image(path, f"{path} (ImageId {image_id})")
        return {
            "image": to_float_tensor(self.transform.image(image)),
            "label": label,
            "boxes": self.transform.boxes(boxes, *image.size),
            "id": image_id,
        }
