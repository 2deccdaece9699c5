"""MXNet RecordIO (.rec/.idx) read without mxnet, from files written here by the format definition."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fame.data import RecordIODataset
from fame.data.images import CorruptSampleError

MAGIC = 0xCED7230A


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def face(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(6 + seed % 3, 5, 3), dtype=np.uint8)


def pack(label: float | list[float], image: bytes, record_id: int = 0, record_id2: int = 0) -> bytes:
    """MXNet's image payload: struct 'IfQQ' (flag, label, id, id2), [flag float32 labels], image."""
    if isinstance(label, list):
        return (
            struct.pack("<IfQQ", len(label), 0.0, record_id, record_id2)
            + struct.pack(f"<{len(label)}f", *label)
            + image
        )
    return struct.pack("<IfQQ", 0, label, record_id, record_id2) + image


def write_part(handle, flag: int, data: bytes) -> None:
    handle.write(struct.pack("<II", MAGIC, (flag << 29) | len(data)))
    handle.write(data + b"\0" * (-len(data) % 4))


def write_record(handle, payload: bytes) -> None:
    """dmlc RecordIOWriter: split at every 4-byte-aligned magic number (flags 1, 2, ..., 3)."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) // 4 * 4, 4) if payload[i : i + 4] == magic]
    start = 0
    for number, cut in enumerate(cuts):
        write_part(handle, 1 if number == 0 else 2, payload[start:cut])
        start = cut + 4
    write_part(handle, 3 if cuts else 0, payload[start:])


def write_recordio(rec: Path, payloads: list[bytes], write_index: bool = True) -> list[int]:
    offsets = []
    with open(rec, "wb") as handle:
        for payload in payloads:
            offsets.append(handle.tell())
            write_record(handle, payload)
    if write_index:
        rec.with_suffix(".idx").write_text("".join(f"{key}\t{offset}\n" for key, offset in enumerate(offsets)))
    return offsets


def insightface_set(tmp_path: Path, labels=(0, 0, 1, 2, 2)) -> tuple[Path, list[np.ndarray]]:
    """Header record 0 with labels (a, b): images 1..a-1, then one record per identity a..b-1."""
    pixels = [face(seed) for seed in range(len(labels))]
    first_identity = len(labels) + 1
    identities = sorted(set(labels))
    payloads = [pack([float(first_identity), float(first_identity + len(identities))], b"")]
    payloads += [
        pack(float(label), png(image), record_id=key + 1) for key, (label, image) in enumerate(zip(labels, pixels))
    ]
    for identity in identities:
        keys = [key + 1 for key, label in enumerate(labels) if label == identity]
        payloads.append(pack([float(keys[0]), float(keys[-1] + 1)], b""))
    write_recordio(tmp_path / "train.rec", payloads)
    return tmp_path / "train.rec", pixels


def test_insightface_header_convention(tmp_path):
    rec, pixels = insightface_set(tmp_path)
    dataset = RecordIODataset(rec)
    assert len(dataset) == 5 and dataset.num_classes == 3
    for (image, label), expected, expected_label in zip(dataset, pixels, (0, 0, 1, 2, 2)):
        assert image.dtype == np.uint8 and image.shape == expected.shape
        np.testing.assert_array_equal(image, expected)
        assert label == expected_label and isinstance(label, int)


def test_newer_writers_start_at_key_zero_without_header(tmp_path):
    pixels = [face(seed) for seed in range(4)]
    payloads = [pack(float(3 - key), png(image)) for key, image in enumerate(pixels[:3])]
    payloads.append(pack([7.0, 0.25], png(pixels[3])))  # multi-label record: the first label is the class
    write_recordio(tmp_path / "train.rec", payloads)
    dataset = RecordIODataset(tmp_path / "train.rec", tmp_path / "train.idx")
    assert [label for _, label in dataset] == [3, 2, 1, 7]
    np.testing.assert_array_equal(dataset[3][0], pixels[3])
    assert dataset.num_classes is None
    (tmp_path / "property").write_text("85742,112,112\n")
    assert RecordIODataset(tmp_path / "train.rec").num_classes == 85742


def test_split_records_are_joined_with_the_magic_reinserted(tmp_path):
    pixels = face(1)
    payload = pack(4.0, png(pixels), record_id=MAGIC, record_id2=MAGIC)  # magic at payload offsets 8 and 16
    offsets = write_recordio(tmp_path / "train.rec", [pack(1.0, png(face(0))), payload])
    raw = (tmp_path / "train.rec").read_bytes()
    flags, position = [], offsets[1]
    while position < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, position)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        position += 8 + ((lrec & (1 << 29) - 1) + 3) // 4 * 4
    assert flags == [1, 2, 3]
    image, label = RecordIODataset(tmp_path / "train.rec")[1]
    np.testing.assert_array_equal(image, pixels)
    assert label == 4
    assert RecordIODataset(tmp_path / "train.rec").records.read(offsets[1], 1) == payload


def test_without_idx_the_rec_is_scanned(tmp_path):
    rec, pixels = insightface_set(tmp_path)
    indexed = RecordIODataset(rec)
    rec.with_suffix(".idx").unlink()
    scanned = RecordIODataset(rec)
    assert scanned.offsets == indexed.offsets and len(scanned) == 5 and scanned.num_classes == 3
    for (image, label), (expected, expected_label) in zip(scanned, indexed):
        np.testing.assert_array_equal(image, expected)
        assert label == expected_label


def test_bad_magic_names_the_file_record_and_offset(tmp_path):
    rec, _ = insightface_set(tmp_path)
    offset = RecordIODataset(rec).offsets[2]
    raw = bytearray(rec.read_bytes())
    raw[offset : offset + 4] = b"\x00\x01\x02\x03"
    rec.write_bytes(bytes(raw))
    dataset = RecordIODataset(rec)
    with pytest.raises(
        CorruptSampleError,
        match=rf"train.rec: record 2, part 0 at byte offset {offset}: "
        r"expected the RecordIO magic number 0xced7230a, found 0x03020100",
    ):
        dataset[1]
    rec.with_suffix(".idx").unlink()
    with pytest.raises(
        CorruptSampleError, match=rf"record 2, part 0 at byte offset {offset}: expected the RecordIO magic"
    ):
        RecordIODataset(rec)


def test_index_and_truncation_errors(tmp_path):
    rec, _ = insightface_set(tmp_path)
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:2] + ["3 x"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"train.idx, line 3: expected 'key<TAB>byte_offset'"):
        RecordIODataset(rec)
    idx.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(ValueError, match=r"header record says images are keys 1..5, but .*train.idx lacks 3"):
        RecordIODataset(rec)
    raw = rec.read_bytes()
    (tmp_path / "cut.rec").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(
        CorruptSampleError,
        match=r"cut.rec: record 8, part 0 at byte offset \d+: the record says \d+ bytes, but the file ends",
    ):
        RecordIODataset(tmp_path / "cut.rec")


def test_corrupt_image_payload_fails_or_is_skipped(tmp_path):
    payloads = [pack(0.0, png(face(0))), pack(1.0, png(face(1))[:30]), pack(2.0, png(face(2)))]
    offsets = write_recordio(tmp_path / "train.rec", payloads)
    with pytest.raises(
        CorruptSampleError, match=rf"train.rec: record 1 at byte offset {offsets[1]}: cannot decode the image"
    ):
        RecordIODataset(tmp_path / "train.rec")[1]
    dataset = RecordIODataset(tmp_path / "train.rec", skip_corrupt=True)
    assert [label for _, label in dataset] == [0, 2, 2]
    assert dataset.skipped == 1


def test_dataset_pickles_without_its_file_handle(tmp_path):
    rec, pixels = insightface_set(tmp_path)
    dataset = RecordIODataset(rec)
    dataset[0]
    copy = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(copy[4][0], pixels[4])
