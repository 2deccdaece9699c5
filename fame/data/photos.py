"""Real photographs that ship with scikit-image and matplotlib, with an ImageNet class and a box each.

The annotations are ``data/photos/photos.json`` of this repository: per photo its ``id``, its
``source`` (one of :data:`PHOTO_SOURCES`; the pixels are read from the installed package at run
time), its size, the ImageNet ``label`` and the ``accepted`` classes, the main object's ``box``
(xmin, ymin, xmax, ymax in source pixels) and its documented origin and licence. The box goes through
the same resize and centre crop as the image, as ImageNet's do (:mod:`fame.data.imagenet`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fame.data.images import ResizeCrop, to_float_tensor

DEFAULT_ANNOTATIONS = Path(__file__).resolve().parents[2] / "data" / "photos" / "photos.json"


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        pixels = getattr(data, name)()
        return pixels[0] if name == "stereo_motorcycle" else pixels  # (left, right, disparity): the left image

    return load


def _matplotlib_sample(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        with cbook.get_sample_data(name) as handle:
            return np.asarray(Image.open(handle).convert("RGB"))

    return load


# The sources an annotation file may name; nothing else is called (files are data).
PHOTO_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    **{f"skimage.data.{name}": _skimage(name) for name in ("chelsea", "coffee", "rocket", "camera")},
    "skimage.data.stereo_motorcycle": _skimage("stereo_motorcycle"),
    "matplotlib.cbook.get_sample_data('grace_hopper.jpg')": _matplotlib_sample("grace_hopper.jpg"),
}


def load_photo(source: str) -> Image.Image:
    """The RGB photo of ``source`` (a key of :data:`PHOTO_SOURCES`; gray photos get three equal channels)."""
    if source not in PHOTO_SOURCES:
        raise ValueError(f"unknown photo source {source!r}; known: {', '.join(PHOTO_SOURCES)}")
    return Image.fromarray(np.ascontiguousarray(PHOTO_SOURCES[source]())).convert("RGB")


def read_photo_annotations(path: str | Path) -> list[dict]:
    """The photo records of an annotation file (see the module docstring), checked field by field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: photo annotations not found (this repository has data/photos/photos.json)")
    records = json.loads(path.read_text(encoding="utf-8")).get("photos")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty list under 'photos'")
    seen = set()
    for number, record in enumerate(records, start=1):
        where = f"{path}, photo {number}"
        missing = {"id", "source", "width", "height", "label", "box"} - set(record)
        if missing:
            raise ValueError(f"{where}: missing {', '.join(sorted(missing))}")
        if record["source"] not in PHOTO_SOURCES:
            raise ValueError(f"{where}: unknown source {record['source']!r}; known: {', '.join(PHOTO_SOURCES)}")
        box = record["box"]
        if len(box) != 4 or not (0 <= box[0] < box[2] <= record["width"] and 0 <= box[1] < box[3] <= record["height"]):
            raise ValueError(f"{where}: box {box} must be xmin < xmax <= width, ymin < ymax <= height")
        if not 0 <= int(record["label"]) < 1000:
            raise ValueError(f"{where}: label {record['label']} is not an ImageNet-1k class index")
        if record["id"] in seen:
            raise ValueError(f"{where}: id {record['id']!r} appears twice")
        seen.add(record["id"])
    return records


class PhotoDataset(Dataset):
    """Real photos: ``[i]`` -> {"image", "label", "boxes", "id"}, as :class:`~fame.data.ImageNetValidation`.

    ``image`` is float (3, crop, crop) in [0, 1] after resizing the shorter side to ``resize`` and
    centre cropping ``crop`` (224 / 224: EfficientNet-Lite0's preprocessing); ``boxes`` (1, 4) is the
    main object's box in output pixels, clipped to the crop. ``ids`` selects photos in that order.
    """

    def __init__(
        self,
        annotations: str | Path | None = None,
        resize: int | None = 224,
        crop: int | None = 224,
        ids: Sequence[str] | None = None,
    ) -> None:
        self.transform = ResizeCrop(resize, crop)
        records = read_photo_annotations(annotations or DEFAULT_ANNOTATIONS)
        by_id = {record["id"]: record for record in records}
        unknown = [name for name in ids or () if name not in by_id]
        if unknown:
            raise ValueError(f"unknown photo ids {unknown}; known: {', '.join(by_id)}")
        self.records = [by_id[name] for name in ids] if ids is not None else records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, object]:
        record = self.records[index]
        photo = load_photo(record["source"])
        if photo.size != (record["width"], record["height"]):
            raise ValueError(
                f"photo {record['id']!r} from {record['source']} is {photo.size[0]}x{photo.size[1]}, but its box was "
                f"drawn on {record['width']}x{record['height']}; the installed package ships another image"
            )
        box = torch.tensor([record["box"]], dtype=torch.float32)
        return {
            "image": to_float_tensor(self.transform.image(photo)),
            "label": int(record["label"]),
            "boxes": self.transform.boxes(box, *photo.size),
            "id": record["id"],
        }
