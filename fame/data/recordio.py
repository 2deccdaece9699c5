"""MXNet RecordIO face training sets (``train.rec`` + ``train.idx``), read without mxnet.

Format (dmlc-core RecordIO and MXNet's image record header, README, "Bring your own data and checkpoints"):

- ``.idx``: text lines ``key<TAB>byte_offset``.
- ``.rec``: records of uint32 magic ``0xced7230a``, uint32 ``lrec`` (continuation flag in the top
  3 bits, length in the low 29), the payload, zero padding to a multiple of 4 bytes. A payload
  that contains the magic number is written in parts with flags 1 (start), 2 (middle), 3 (end);
  the reader joins the parts with the magic bytes re-inserted. Flag 0 is a whole record.
- Payload: header struct ``IfQQ`` (flag, label, id, id2), little-endian, 24 bytes; if
  ``flag > 0``, ``flag`` float32 labels follow and replace ``label``; the rest is the encoded
  image.
- insightface sets: record 0 is a header without image whose labels ``(a, b)`` say the images
  are records ``1 .. a-1`` (records ``a .. b-1`` describe identities, so there are ``b - a``
  classes). Newer writers store images from key 0 without a header record.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fame.data.images import CorruptSampleError, SkipCorruptDataset, decode_image, to_uint8_array

RECORDIO_MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
RECORD_HEADER = struct.Struct("<II")
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
IMAGE_HEADER = struct.Struct("<IfQQ")
WHOLE, START, MIDDLE, END = 0, 1, 2, 3


@dataclass(frozen=True)
class ImageRecord:
    """A decoded payload: header fields, the labels (one or ``flag`` of them) and image bytes."""

    flag: int
    labels: tuple[float, ...]
    id: int
    id2: int
    image: bytes


def unpack_image_record(payload: bytes, where: str) -> ImageRecord:
    """Split a payload into the ``IfQQ`` header, its labels and the encoded image."""
    if len(payload) < IMAGE_HEADER.size:
        raise CorruptSampleError(f"{where}: payload of {len(payload)} bytes is shorter than the 24-byte IfQQ header.")
    flag, label, record_id, record_id2 = IMAGE_HEADER.unpack_from(payload)
    start = IMAGE_HEADER.size
    if flag == 0:
        return ImageRecord(flag, (label,), record_id, record_id2, payload[start:])
    end = start + 4 * flag
    if len(payload) < end:
        raise CorruptSampleError(
            f"{where}: header says {flag} float32 labels follow, but the payload ends after {len(payload)} bytes."
        )
    labels = tuple(float(value) for value in np.frombuffer(payload, dtype="<f4", count=flag, offset=start))
    return ImageRecord(flag, labels, record_id, record_id2, payload[end:])


class RecordFile:
    """Random access to the records of a ``.rec`` file (one handle per process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: RecordIO file not found.")
        self.size = self.path.stat().st_size
        self._handle: BinaryIO | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "_handle": None, "_pid": None}

    def _file(self) -> BinaryIO:
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.path, "rb")
            self._pid = os.getpid()
        return self._handle

    def _parts(self, offset: int, key: int | str) -> tuple[list[tuple[int, int]], int]:
        """Follow the parts of the record at ``offset`` -> ([(data offset, length)], end offset)."""
        handle = self._file()
        parts: list[tuple[int, int]] = []
        position = offset
        while True:
            where = f"{self.path}: record {key}, part {len(parts)} at byte offset {position}"
            handle.seek(position)
            header = handle.read(RECORD_HEADER.size)
            if len(header) < RECORD_HEADER.size:
                raise CorruptSampleError(
                    f"{where}: the file ends inside the 8-byte record header (file size {self.size})."
                )
            magic, lrec = RECORD_HEADER.unpack(header)
            if magic != RECORDIO_MAGIC:
                raise CorruptSampleError(
                    f"{where}: expected the RecordIO magic number 0x{RECORDIO_MAGIC:08x}, found 0x{magic:08x}. "
                    "The file is damaged, or the .idx offsets do not belong to this .rec (delete the .idx to "
                    "rebuild the offsets by scanning)."
                )
            flag, length = lrec >> LENGTH_BITS, lrec & LENGTH_MASK
            expected = (WHOLE, START) if not parts else (MIDDLE, END)
            if flag not in expected:
                raise CorruptSampleError(f"{where}: continuation flag {flag}, expected one of {expected}.")
            data_offset = position + RECORD_HEADER.size
            if data_offset + length > self.size:
                raise CorruptSampleError(f"{where}: the record says {length} bytes, but the file ends at {self.size}.")
            parts.append((data_offset, length))
            position = data_offset + ((length + 3) & ~3)
            if flag in (WHOLE, END):
                return parts, position

    def read(self, offset: int, key: int | str) -> bytes:
        """The payload of the record at ``offset``, split parts joined with the magic re-inserted."""
        parts, _ = self._parts(offset, key)
        handle = self._file()
        chunks = []
        for data_offset, length in parts:
            handle.seek(data_offset)
            chunks.append(handle.read(length))
        return MAGIC_BYTES.join(chunks)

    def scan(self) -> list[int]:
        """Offsets of all records in file order (reads only the 8-byte headers)."""
        offsets: list[int] = []
        position = 0
        while position < self.size:
            offsets.append(position)
            _, position = self._parts(position, len(offsets) - 1)
        return offsets


def read_idx(path: str | Path) -> dict[int, int]:
    """Read a ``.idx`` file: ``key<TAB>byte_offset`` per line, kept in file order."""
    path = Path(path)
    offsets: dict[int, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not all(field.isdigit() for field in fields):
                raise ValueError(
                    f"{path}, line {number}: expected 'key<TAB>byte_offset' (two integers), got {line.rstrip()!r}."
                )
            key, offset = int(fields[0]), int(fields[1])
            if key in offsets:
                raise ValueError(f"{path}, line {number}: key {key} appears twice.")
            offsets[key] = offset
    return offsets


def read_property_file(path: Path) -> int:
    """insightface's ``property`` file: ``num_classes,height,width``."""
    fields = path.read_text(encoding="utf-8").strip().split(",")
    if not fields[0].strip().isdigit():
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {fields}.")
    return int(fields[0])


class RecordIODataset(SkipCorruptDataset):
    """Images of a RecordIO face training set: ``[i]`` -> (uint8 RGB (H, W, 3), int label).

    ``idx_path`` defaults to the ``.rec`` path with ``.idx``; without one, the ``.rec`` is
    scanned and keys are the record positions 0, 1, 2, ... ``num_classes`` is ``b - a`` from an
    insightface header record, else the first number of a ``property`` file beside the
    ``.rec``, else ``None``.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, skip_corrupt: bool = False) -> None:
        super().__init__(skip_corrupt)
        self.records = RecordFile(rec_path)
        rec_path = self.records.path
        if idx_path is None and rec_path.with_suffix(".idx").is_file():
            idx_path = rec_path.with_suffix(".idx")
        if idx_path is not None:
            self.offsets = read_idx(idx_path)
            index_source = str(idx_path)
        else:
            self.offsets = dict(enumerate(self.records.scan()))
            index_source = f"the scan of {rec_path}"
        if not self.offsets:
            raise ValueError(f"{rec_path}: no records found (in {index_source}).")
        self.num_classes: int | None = None
        header = self._header_labels()
        if header is not None:
            first_identity, identity_end = header
            self.keys = list(range(1, first_identity))
            missing = [key for key in self.keys if key not in self.offsets]
            if missing:
                raise ValueError(
                    f"{rec_path}: the header record says images are keys 1..{first_identity - 1}, but {index_source} "
                    f"lacks {len(missing)} of them (first: {missing[:3]})."
                )
            if identity_end > first_identity:
                self.num_classes = identity_end - first_identity
        else:
            self.keys = list(self.offsets)
        property_file = rec_path.parent / "property"
        if self.num_classes is None and property_file.is_file():
            self.num_classes = read_property_file(property_file)

    def _header_labels(self) -> tuple[int, int] | None:
        """(a, b) of an insightface header record 0 (labels but no image), else None."""
        if 0 not in self.offsets:
            return None
        where = f"{self.records.path}: record 0 at byte offset {self.offsets[0]}"
        record = unpack_image_record(self.records.read(self.offsets[0], 0), where)
        if record.flag < 2 or record.image:
            return None
        return int(record.labels[0]), int(record.labels[1])

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        key = self.keys[index]
        offset = self.offsets[key]
        where = f"{self.records.path}: record {key} at byte offset {offset}"
        record = unpack_image_record(self.records.read(offset, key), where)
        return to_uint8_array(decode_image(record.image, where)), int(record.labels[0])
