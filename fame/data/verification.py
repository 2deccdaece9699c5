"""Face verification pairs: insightface ``.bin`` sets, G/P/T pair CSVs and LFW ``pairs.txt``.

- insightface ``.bin`` (lfw, cfp_fp, agedb_30, calfw, cplfw, ...): a pickle of
  ``(list of 2N encoded JPEG/PNG byte strings, list of N bools)``; pair ``k`` is images
  ``2k`` and ``2k + 1``. The sets were written by Python 2 (py2 ``str`` -> ``encoding="bytes"``).
  Pickles can run code, so they are read by :class:`RestrictedUnpickler`, which builds only
  builtin containers, bytes and bools.
- Pair CSV: columns ``G`` (gallery path), ``P`` (probe path), ``T`` (1 genuine, 0 impostor);
  paths relative to a root folder, or keys of an HDF5 file of crops.
- LFW ``pairs.txt``: a header line (``folds pairs_per_fold``, or one count), then ``name i j``
  (genuine) and ``name1 i name2 j`` (impostor) lines; images ``root/name/name_%04d.jpg``.
"""

from __future__ import annotations

import csv
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fame.data.images import (
    CorruptSampleError,
    SkipCorruptDataset,
    decode_image,
    read_image,
    to_float_tensor,
    to_uint8_array,
)

PAIR_COLUMNS = ("G", "P", "T")


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something a verification set never needs."""


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 writes ``bytes`` under pickle protocol 2 (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"_codecs.encode is admitted only as encode(str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin-1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for verification sets: no global except the byte-string constructors.

    A Python 2 ``.bin`` needs no global at all (``str`` -> BINSTRING, ``bool`` -> NEWTRUE /
    NEWFALSE). A set re-pickled by Python 3 with protocol 2 writes ``bytes`` as
    ``_codecs.encode(str, "latin1")`` and ``bytearray`` as ``__builtin__.bytearray(bytes)``; those
    exact names are admitted (``encode`` restricted to latin-1). Anything else is refused.
    """

    ADMITTED = {
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytearray"): bytearray,
        ("builtins", "bytearray"): bytearray,
    }

    def find_class(self, module: str, name: str) -> Any:
        admitted = self.ADMITTED.get((module, name))
        if admitted is None:
            raise RefusedPickle(f"the pickle asks for the global {module}.{name}")
        return admitted


def read_bin_records(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """Unpickle an insightface ``.bin`` safely -> (2N encoded images, N issame flags)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            content = RestrictedUnpickler(handle, encoding="bytes").load()
    except RefusedPickle as error:
        raise ValueError(
            f"{path}: refused to unpickle ({error}). An insightface verification .bin holds only a list of "
            "encoded images and a list of booleans; this file is not one and may be malicious."
        ) from error
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
        MemoryError,
    ) as error:
        raise ValueError(
            f"{path}: not a readable insightface verification .bin ({type(error).__name__}: {error})."
        ) from error
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise ValueError(f"{path}: expected a pickled pair (images, issame), got {type(content).__name__}.")
    images, issame = content
    if not isinstance(images, list) or not all(isinstance(image, (bytes, bytearray)) for image in images):
        raise ValueError(f"{path}: expected the first element to be a list of encoded image byte strings.")
    if not isinstance(issame, list) or not all(isinstance(flag, bool) for flag in issame):
        raise ValueError(f"{path}: expected the second element to be a list of booleans (one per pair).")
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs; expected exactly 2 images per pair.")
    return [bytes(image) for image in images], issame


def load_verification_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an insightface ``.bin`` -> (images uint8 (2N, H, W, 3) RGB, issame bool (N,))."""
    blobs, issame = read_bin_records(path)
    decoded = [to_uint8_array(decode_image(blob, f"{path}, image {i} (pair {i // 2})")) for i, blob in enumerate(blobs)]
    shapes = {image.shape for image in decoded}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images have different sizes {sorted(shapes)}; expected one size for all.")
    images = np.stack(decoded) if decoded else np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return images, np.asarray(issame, dtype=bool)


@dataclass(frozen=True)
class VerificationPair:
    """One pair: image keys in the pair's image source, genuine flag and a stable id."""

    gallery: str
    probe: str
    same: bool
    id: str
    source: str


class EncodedImages:
    """Images held as encoded bytes in memory (a ``.bin``), keyed by their index as text."""

    def __init__(self, blobs: Sequence[bytes], origin: str) -> None:
        self.blobs = blobs
        self.origin = origin

    def read(self, key: str, where: str) -> Image.Image:
        return decode_image(self.blobs[int(key)], f"{self.origin}, image {key} ({where})")

    def check(self, key: str, where: str) -> None:
        if not 0 <= int(key) < len(self.blobs):
            raise IndexError(f"{where}: image index {key} is out of range for {self.origin}.")


class FileImages:
    """Image files below a root folder, keyed by relative path."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, key: str, where: str) -> Image.Image:
        return read_image(self.root / key, f"{self.root / key} ({where})")

    def check(self, key: str, where: str) -> None:
        if not (self.root / key).is_file():
            raise FileNotFoundError(f"{where}: image {self.root / key} does not exist.")


class HDF5Images:
    """Crops stored in an HDF5 file, one dataset per key.

    A dataset holds either RGB pixels (uint8 (H, W, 3), or (H, W) gray) or the encoded image
    file (1-D uint8 or a bytes scalar). The file is opened lazily once per process, so the
    source can be used from DataLoader workers.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_handle": None, "_pid": None}

    def _file(self) -> Any:
        import h5py

        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def check(self, key: str, where: str) -> None:
        if key not in self._file():
            raise KeyError(f"{where}: key {key!r} is not a dataset in {self.path}.")

    def read(self, key: str, where: str) -> Image.Image:
        source = f"{self.path}[{key!r}] ({where})"
        value = self._file()[key][()]
        if isinstance(value, (bytes, np.void)):
            return decode_image(bytes(value), source)
        array = np.asarray(value)
        if array.dtype == np.uint8 and array.ndim == 1:
            return decode_image(array.tobytes(), source)
        if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            return Image.fromarray(array).convert("RGB")
        raise CorruptSampleError(
            f"{source}: expected uint8 RGB pixels (H, W, 3) or encoded image bytes, got dtype {array.dtype} "
            f"and shape {array.shape}."
        )


ImageSource = EncodedImages | FileImages | HDF5Images


class PairsDataset(SkipCorruptDataset):
    """Verification pairs: ``[k]`` -> {"gallery", "probe": float (3, H, W) in [0, 1], "same", "id"}.

    Build it with :meth:`from_bin`, :meth:`from_csv` or :meth:`from_lfw_pairs`. ``size``
    resizes both images to ``size`` x ``size`` (they are aligned crops, so no aspect handling).
    """

    def __init__(
        self,
        pairs: Sequence[VerificationPair],
        images: ImageSource,
        size: int | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(skip_corrupt)
        self.pairs = list(pairs)
        self.images = images
        self.size = size
        for pair in self.pairs:
            images.check(pair.gallery, pair.source)
            images.check(pair.probe, pair.source)

    @classmethod
    def from_bin(cls, path: str | Path, size: int | None = None, skip_corrupt: bool = False) -> PairsDataset:
        """Pairs of an insightface ``.bin``; ids ``<file stem>/<pair index>``."""
        path = Path(path)
        blobs, issame = read_bin_records(path)
        pairs = [
            VerificationPair(str(2 * k), str(2 * k + 1), same, f"{path.stem}/{k}", f"{path}, pair {k}")
            for k, same in enumerate(issame)
        ]
        return cls(pairs, EncodedImages(blobs, str(path)), size, skip_corrupt)

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        root: str | Path | None = None,
        hdf5: str | Path | None = None,
        size: int | None = None,
        skip_corrupt: bool = False,
    ) -> PairsDataset:
        """Pairs from a ``G,P,T`` CSV; paths relative to ``root`` (default: the CSV's folder)
        or keys of the HDF5 file ``hdf5``. Ids ``<file stem>/<data row index>``."""
        path = Path(path)
        if root is not None and hdf5 is not None:
            raise ValueError(f"{path}: give either root (image files) or hdf5 (crops), not both.")
        pairs = []
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or []]
            if any(column not in columns for column in PAIR_COLUMNS):
                raise ValueError(
                    f"{path}: expected the columns G (gallery), P (probe), T (1 genuine, 0 impostor), found {columns}."
                )
            reader.fieldnames = columns
            for index, row in enumerate(reader):
                where = f"{path}, row {index + 2}"
                label = (row["T"] or "").strip()
                if label not in ("0", "1"):
                    raise ValueError(f"{where}: T must be 1 (genuine) or 0 (impostor), got {row['T']!r}.")
                gallery, probe = (row["G"] or "").strip(), (row["P"] or "").strip()
                if not gallery or not probe:
                    raise ValueError(f"{where}: G and P must name the gallery and probe images.")
                pairs.append(VerificationPair(gallery, probe, label == "1", f"{path.stem}/{index}", where))
        images: ImageSource = (
            HDF5Images(Path(hdf5)) if hdf5 is not None else FileImages(Path(root) if root is not None else path.parent)
        )
        return cls(pairs, images, size, skip_corrupt)

    @classmethod
    def from_lfw_pairs(
        cls,
        pairs_txt: str | Path,
        root: str | Path,
        ext: str = "jpg",
        size: int | None = None,
        skip_corrupt: bool = False,
    ) -> PairsDataset:
        """Pairs from LFW ``pairs.txt``; images ``root/name/name_%04d.<ext>``.
        Ids ``<file stem>/<pair index>``."""
        pairs_txt = Path(pairs_txt)
        lines = [line.split() for line in pairs_txt.read_text(encoding="utf-8").splitlines()]
        if not lines or not lines[0] or not all(field.isdigit() for field in lines[0]) or len(lines[0]) > 2:
            raise ValueError(
                f"{pairs_txt}, line 1: expected a header 'folds pairs_per_fold' (or one count) of integers."
            )
        expected = 2 * int(np.prod([int(field) for field in lines[0]]))

        def image(name: str, number: str, where: str) -> str:
            if not number.isdigit():
                raise ValueError(f"{where}: image number must be an integer, got {number!r}.")
            return f"{name}/{name}_{int(number):04d}.{ext}"

        pairs = []
        for line_number, fields in enumerate(lines[1:], start=2):
            if not fields:
                continue
            where = f"{pairs_txt}, line {line_number}"
            if len(fields) == 3:
                name, first, second = fields
                pair = (image(name, first, where), image(name, second, where), True)
            elif len(fields) == 4:
                pair = (image(fields[0], fields[1], where), image(fields[2], fields[3], where), False)
            else:
                raise ValueError(
                    f"{where}: expected 'name i j' (genuine) or 'name1 i name2 j' (impostor), got {fields}."
                )
            pairs.append(VerificationPair(*pair, f"{pairs_txt.stem}/{len(pairs)}", where))
        if len(pairs) != expected:
            raise ValueError(f"{pairs_txt}: the header promises {expected} pairs, found {len(pairs)}.")
        return cls(pairs, FileImages(Path(root)), size, skip_corrupt)

    def __len__(self) -> int:
        return len(self.pairs)

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        if self.size is not None and image.size != (self.size, self.size):
            image = TF.resize(image, [self.size, self.size], interpolation=TF.InterpolationMode.BILINEAR)
        return to_float_tensor(image)

    def load(self, index: int) -> dict[str, object]:
        pair = self.pairs[index]
        return {
            "gallery": self._tensor(self.images.read(pair.gallery, pair.source)),
            "probe": self._tensor(self.images.read(pair.probe, pair.source)),
            "same": pair.same,
            "id": pair.id,
        }
