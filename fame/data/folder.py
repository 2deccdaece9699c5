"""A generic classification folder (``root/<class>/<image>``) with optional boxes or masks.

Classes are the sorted sub-folders of ``root`` (label = position), or the lines of a synsets file
(line ``i`` names the folder of class ``i`` by its first word, e.g. ImageNet's
``LOC_synset_mapping.txt``, so the labels are a pretrained model's class indices); images are found
recursively inside the class folders, and the id of an image is its path relative to ``root`` with
``/`` separators.

Side files, mapped through the same resize/crop as the image:

- boxes: a CSV with columns ``path,xmin,ymin,xmax,ymax`` (``path`` relative to ``root``; one row
  per box, several rows per image allowed) -> item ``"boxes"`` (K, 4) xyxy in output pixels;
- masks: a folder holding one mask image per image under the same relative name (the same file
  name, or the same name with a ``.png`` extension) -> item ``"mask"`` float (1, H, W) in [0, 1].
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from fame.data.images import (
    IMAGE_EXTENSIONS,
    CorruptSampleError,
    ResizeCrop,
    SkipCorruptDataset,
    read_image,
    to_float_tensor,
)

BOX_COLUMNS = ("path", "xmin", "ymin", "xmax", "ymax")


def read_class_names(path: str | Path) -> list[str]:
    """The class folder names of a synsets file: the first word of each non-empty line, in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: synsets file not found; expected one line per class, its folder name first.")
    names = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no classes found; expected one line per class, its folder name first.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: the classes {repeated[:3]} appear more than once.")
    return names


def count_classes(*sources: str | Path | None) -> int | None:
    """The number of classes of the first source given: the lines of a synsets file or the
    sub-folders of an image folder (``data.num_classes`` of ``configs/data/image_folder.yaml``);
    None when no source exists."""
    for source in sources:
        if source is None or not Path(source).exists():
            continue
        path = Path(source)
        if path.is_file():
            return len(read_class_names(path))
        return sum(1 for entry in path.iterdir() if entry.is_dir())
    return None


def read_box_csv(path: str | Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """Read a ``path,xmin,ymin,xmax,ymax`` CSV into relative path -> list of boxes."""
    path = Path(path)
    boxes: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        if any(column not in columns for column in BOX_COLUMNS):
            raise ValueError(f"{path}: expected the columns {','.join(BOX_COLUMNS)}, found {columns}.")
        reader.fieldnames = columns
        for row_number, row in enumerate(reader, start=2):
            try:
                box = tuple(float(row[key]) for key in BOX_COLUMNS[1:])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}, row {row_number}: xmin, ymin, xmax, ymax must be numbers, got "
                    f"{[row[key] for key in BOX_COLUMNS[1:]]}."
                ) from None
            if box[2] < box[0] or box[3] < box[1]:
                raise ValueError(f"{path}, row {row_number}: expected xmin <= xmax and ymin <= ymax, got {box}.")
            boxes[Path(row["path"].strip()).as_posix()].append(box)  # type: ignore[arg-type]
    return dict(boxes)


class ImageFolderDataset(SkipCorruptDataset):
    """``root/<class>/.../<image>`` -> {"image", "label", "id"} plus "boxes" or "mask".

    ``size`` resizes the shorter side (aspect ratio kept) and ``crop`` centre crops (``crop``
    defaults to ``size``, so batches are square); both ``None`` keeps images as they are.
    ``side_file`` is a box CSV or a mask folder (see the module docstring); ``synsets`` a file
    naming the class folders in label order (sub-folders it does not name are an error; classes
    without a folder have no images).
    """

    def __init__(
        self,
        root: str | Path,
        size: int | None = None,
        side_file: str | Path | None = None,
        crop: int | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_corrupt: bool = False,
        synsets: str | Path | None = None,
    ) -> None:
        super().__init__(skip_corrupt)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found.")
        self.transform = ResizeCrop(size, crop if crop is not None else size)
        folders = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        if not folders:
            raise FileNotFoundError(f"{self.root}: no class sub-folders found; expected root/<class>/<image>.")
        self.classes = folders if synsets is None else read_class_names(synsets)
        unnamed = [folder for folder in folders if folder not in self.classes]
        if unnamed:
            raise ValueError(
                f"{self.root}: the class folders {unnamed[:3]} are not named in the synsets file {synsets}."
            )
        suffixes = {extension.lower() for extension in extensions}
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            if name not in folders:
                continue
            files = sorted(p for p in (self.root / name).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            self.samples.extend((path.relative_to(self.root).as_posix(), label) for path in files)
        if not self.samples:
            raise FileNotFoundError(f"{self.root}: no images with extensions {sorted(suffixes)} in the class folders.")
        self.boxes: dict[str, torch.Tensor] | None = None
        self.mask_root: Path | None = None
        if side_file is not None:
            side_file = Path(side_file)
            if side_file.is_dir():
                self.mask_root = side_file
            elif side_file.is_file():
                self.boxes = self._boxes_from(side_file)
            else:
                raise FileNotFoundError(f"{side_file}: side file not found; expected a box CSV or a folder of masks.")

    def _boxes_from(self, path: Path) -> dict[str, torch.Tensor]:
        table = read_box_csv(path)
        known = {relative for relative, _ in self.samples}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{path}: boxes given for images not in {self.root} (first: {unknown[:3]}).")
        return {
            relative: torch.tensor(table.get(relative, []), dtype=torch.float32).reshape(-1, 4) for relative in known
        }

    @staticmethod
    def _mask_path(mask_root: Path, relative: str) -> Path:
        """The mask file of an image: same relative name, or the same name with ``.png``."""
        same_name = mask_root / relative
        if same_name.is_file():
            return same_name
        as_png = same_name.with_suffix(".png")
        if as_png.is_file():
            return as_png
        raise FileNotFoundError(f"{mask_root}: no mask for image {relative}; expected {same_name} or {as_png}.")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> dict[str, object]:
        relative, label = self.samples[index]
        image = read_image(self.root / relative)
        item: dict[str, object] = {
            "image": to_float_tensor(self.transform.image(image)),
            "label": label,
            "id": relative,
        }
        if self.boxes is not None:
            item["boxes"] = self.transform.boxes(self.boxes[relative], *image.size)
        if self.mask_root is not None:
            item["mask"] = self._mask(self.mask_root, relative, image.size)
        return item

    def _mask(self, mask_root: Path, relative: str, image_size: tuple[int, int]) -> torch.Tensor:
        path = self._mask_path(mask_root, relative)
        try:
            with Image.open(path) as opened:
                mask = opened.convert("L")
        except OSError as error:
            raise CorruptSampleError(
                f"{path}: cannot decode the mask of {relative} ({error}); expected a PNG image."
            ) from error
        if mask.size != image_size:
            raise ValueError(
                f"{path}: mask is {mask.size[0]}x{mask.size[1]}, "
                f"but image {relative} is {image_size[0]}x{image_size[1]}."
            )
        return to_float_tensor(self.transform.mask(mask))
