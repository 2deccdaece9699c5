"""Face training images stored as one folder per identity (``root/<identity>/<image>``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fame.data.images import IMAGE_EXTENSIONS, SkipCorruptDataset, read_image, to_uint8_array


class IdentityFolderDataset(SkipCorruptDataset):
    """``[i]`` -> (uint8 RGB (H, W, 3), int label); label = index of the sorted identity folder.

    Images are found recursively inside each identity folder and ordered by path.
    """

    def __init__(
        self, root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, skip_corrupt: bool = False
    ) -> None:
        super().__init__(skip_corrupt)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: identity folder not found.")
        self.identities = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        suffixes = {extension.lower() for extension in extensions}
        self.samples: list[tuple[Path, int]] = []
        for label, identity in enumerate(self.identities):
            files = sorted(p for p in (self.root / identity).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            self.samples.extend((path, label) for path in files)
        if not self.samples:
            raise FileNotFoundError(
                f"{self.root}: no images found; expected root/<identity>/<image> with extensions {sorted(suffixes)}."
            )

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        return to_uint8_array(read_image(path)), label
