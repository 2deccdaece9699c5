"""Verification pairs: insightface .bin (restricted unpickling), G/P/T CSV (+HDF5), LFW pairs.txt."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from fame.data import PairsDataset, load_verification_bin
from fame.data.images import CorruptSampleError


def face(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def python2_pickle(blobs: list[bytes], issame: list[bool]) -> bytes:
    """``pickle.dump((blobs, issame), f, protocol=2)`` as Python 2's pickler wrote it.

    Python 2 ``str`` -> SHORT_BINSTRING ('U') / BINSTRING ('T'), bools -> NEWTRUE / NEWFALSE,
    lists -> EMPTY_LIST then MARK ... APPENDS in batches of 1000 (APPEND for a single item),
    every str / list / tuple memoized with BINPUT ('q') or LONG_BINPUT ('r').
    """
    out = bytearray(b"\x80\x02")
    memo = 0

    def put() -> None:
        nonlocal memo
        out.extend(b"q" + bytes([memo]) if memo < 256 else b"r" + struct.pack("<I", memo))
        memo += 1

    def save_list(items, save_item) -> None:
        out.extend(b"]")
        put()
        for start in range(0, len(items), 1000):
            batch = items[start : start + 1000]
            if len(batch) > 1:
                out.extend(b"(")
            for item in batch:
                save_item(item)
            out.extend(b"e" if len(batch) > 1 else b"a")

    def save_str(data: bytes) -> None:
        out.extend(b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data)))
        out.extend(data)
        put()

    save_list(blobs, save_str)
    save_list(issame, lambda flag: out.extend(b"\x88" if flag else b"\x89"))
    out.extend(b"\x86")
    put()
    out.extend(b".")
    return bytes(out)


def pairs_data(count: int = 3) -> tuple[list[np.ndarray], list[bytes], list[bool]]:
    pixels = [face(seed) for seed in range(2 * count)]
    return pixels, [png(image) for image in pixels], [k % 2 == 0 for k in range(count)]


def test_python2_bin_loads_exactly(tmp_path):
    pixels, blobs, issame = pairs_data()
    blobs[0] = blobs[0] + b"\0" * 300  # a long record: BINSTRING instead of SHORT_BINSTRING
    path = tmp_path / "lfw.bin"
    path.write_bytes(python2_pickle(blobs, issame))
    images, same = load_verification_bin(path)
    assert images.dtype == np.uint8 and images.shape == (6, 12, 12, 3)
    np.testing.assert_array_equal(images, np.stack(pixels))
    assert same.dtype == bool and same.tolist() == issame


def test_many_records_use_batched_appends_and_long_memo(tmp_path):
    blob = png(face(0, size=2))
    path = tmp_path / "big.bin"
    path.write_bytes(python2_pickle([blob] * 2400, [True] * 1200))
    images, same = load_verification_bin(path)
    assert images.shape == (2400, 2, 2, 3) and same.all()


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("container", [bytes, bytearray])
def test_python3_written_bins_load(tmp_path, protocol, container):
    pixels, blobs, issame = pairs_data(2)
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps(([container(blob) for blob in blobs], issame), protocol=protocol))
    images, same = load_verification_bin(path)
    np.testing.assert_array_equal(images, np.stack(pixels))
    assert same.tolist() == issame


class RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsExec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, protocol):
    marker = tmp_path / "payload_ran"
    payloads = {
        r"posix\.system": RunsShell(f"touch {marker}"),
        r"(builtins|__builtin__)\.exec": RunsExec(f"open({str(marker)!r}, 'w').close()"),
    }
    _, blobs, issame = pairs_data(1)
    for name, payload in payloads.items():
        path = tmp_path / f"evil_{protocol}.bin"
        path.write_bytes(pickle.dumps((blobs, issame, payload), protocol=protocol))
        with pytest.raises(ValueError, match=rf"evil_{protocol}.bin: refused to unpickle.*{name}"):
            load_verification_bin(path)
        path.write_bytes(pickle.dumps(([payload], [True]), protocol=protocol))
        with pytest.raises(ValueError, match=rf"refused to unpickle.*{name}"):
            PairsDataset.from_bin(path)
        assert not marker.exists()


def test_admitted_globals_are_restricted(tmp_path):
    # _codecs.encode is admitted only for latin-1, as Python 3 writes bytes under protocol 2.
    rot13 = b"\x80\x02]q\x00(c_codecs\nencode\nX\x02\x00\x00\x00abX\x05\x00\x00\x00rot13\x86Re]\x88\x86."
    (tmp_path / "rot.bin").write_bytes(rot13)
    with pytest.raises(ValueError, match=r"rot.bin: refused to unpickle.*latin1"):
        load_verification_bin(tmp_path / "rot.bin")
    # insightface sets hold Python bools; a numpy array would need numpy's reconstructors, refused.
    (tmp_path / "np.bin").write_bytes(pickle.dumps(([b"x", b"y"], np.array([True])), protocol=2))
    with pytest.raises(ValueError, match=r"np.bin: refused to unpickle.*numpy"):
        load_verification_bin(tmp_path / "np.bin")


def test_malformed_bins_get_clear_errors(tmp_path):
    _, blobs, issame = pairs_data(2)
    cases = {
        "count.bin": (python2_pickle(blobs[:3], issame), "3 images for 2 pairs"),
        "shape.bin": (pickle.dumps([blobs], protocol=2), "expected a pickled pair"),
        "truncated.bin": (python2_pickle(blobs, issame)[:50], "not a readable insightface verification .bin"),
        "flags.bin": (pickle.dumps((blobs, [1, 0]), protocol=2), "list of booleans"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}: .*{message}"):
            load_verification_bin(tmp_path / name)


def test_corrupt_image_in_bin_is_named_or_skipped(tmp_path):
    pixels, blobs, issame = pairs_data(3)
    blobs[3] = blobs[3][:40]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(python2_pickle(blobs, issame))
    with pytest.raises(CorruptSampleError, match=r"agedb_30.bin, image 3 \(pair 1\): cannot decode"):
        load_verification_bin(path)
    dataset = PairsDataset.from_bin(path, skip_corrupt=True)
    assert [item["id"] for item in dataset] == ["agedb_30/0", "agedb_30/2", "agedb_30/2"]
    assert dataset.skipped == 1


def test_pairs_from_bin(tmp_path):
    pixels, blobs, issame = pairs_data(3)
    path = tmp_path / "calfw.bin"
    path.write_bytes(python2_pickle(blobs, issame))
    dataset = PairsDataset.from_bin(path)
    assert len(dataset) == 3
    item = dataset[1]
    assert set(item) == {"gallery", "probe", "same", "id"}
    assert item["id"] == "calfw/1" and item["same"] is False
    torch.testing.assert_close(item["gallery"], torch.from_numpy(pixels[2]).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(item["probe"], torch.from_numpy(pixels[3]).permute(2, 0, 1).float() / 255)
    assert PairsDataset.from_bin(path, size=16)[0]["probe"].shape == (3, 16, 16)


def write_faces(root: Path, names: dict[str, np.ndarray]) -> None:
    for name, pixels in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)


def test_pairs_from_csv_with_root(tmp_path):
    faces = {"alice/1.png": face(1), "alice/2.png": face(2), "bob/1.png": face(3)}
    write_faces(tmp_path / "crops", faces)
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("G,P,T\nalice/1.png,alice/2.png,1\nalice/1.png,bob/1.png,0\n")
    dataset = PairsDataset.from_csv(csv_path, root=tmp_path / "crops")
    items = list(dataset)
    assert [(item["id"], item["same"]) for item in items] == [("pairs/0", True), ("pairs/1", False)]
    torch.testing.assert_close(items[1]["probe"], torch.from_numpy(faces["bob/1.png"]).permute(2, 0, 1).float() / 255)
    (tmp_path / "crops" / "pairs_here.csv").write_text(" G , P , T \nalice/2.png,bob/1.png,0\n")
    assert PairsDataset.from_csv(tmp_path / "crops" / "pairs_here.csv")[0]["same"] is False  # root = CSV folder


def test_pair_csv_errors_name_file_columns_and_rows(tmp_path):
    write_faces(tmp_path, {"a.png": face(1)})
    (tmp_path / "cols.csv").write_text("gallery,probe,label\na.png,a.png,1\n")
    with pytest.raises(ValueError, match=r"cols.csv: expected the columns G .*found \['gallery', 'probe', 'label'\]"):
        PairsDataset.from_csv(tmp_path / "cols.csv")
    (tmp_path / "label.csv").write_text("G,P,T\na.png,a.png,1\na.png,a.png,yes\n")
    with pytest.raises(ValueError, match=r"label.csv, row 3: T must be 1 \(genuine\) or 0"):
        PairsDataset.from_csv(tmp_path / "label.csv")
    (tmp_path / "missing.csv").write_text("G,P,T\na.png,b.png,0\n")
    with pytest.raises(FileNotFoundError, match=r"missing.csv, row 2: image .*b.png does not exist"):
        PairsDataset.from_csv(tmp_path / "missing.csv")


def test_pairs_from_csv_with_hdf5_crops(tmp_path):
    faces = {"alice/1.jpg": face(1), "alice/2.jpg": face(2), "bob/1.jpg": face(3)}
    with h5py.File(tmp_path / "crops.h5", "w") as store:
        store.create_dataset("alice/1.jpg", data=faces["alice/1.jpg"])  # RGB pixels
        store.create_dataset("alice/2.jpg", data=np.void(png(faces["alice/2.jpg"])))  # encoded, opaque
        store.create_dataset("bob/1.jpg", data=np.frombuffer(png(faces["bob/1.jpg"]), dtype=np.uint8))  # encoded, 1-D
        store.create_dataset("bad", data=np.zeros((2, 2, 2), dtype=np.float32))
    (tmp_path / "pairs.csv").write_text("G,P,T\nalice/1.jpg,alice/2.jpg,1\nalice/2.jpg,bob/1.jpg,0\nbad,bob/1.jpg,0\n")
    dataset = PairsDataset.from_csv(tmp_path / "pairs.csv", hdf5=tmp_path / "crops.h5")
    first, second = dataset[0], dataset[1]
    for tensor, name in [
        (first["gallery"], "alice/1.jpg"),
        (first["probe"], "alice/2.jpg"),
        (second["probe"], "bob/1.jpg"),
    ]:
        torch.testing.assert_close(tensor, torch.from_numpy(faces[name]).permute(2, 0, 1).float() / 255)
    with pytest.raises(CorruptSampleError, match=r"crops.h5\['bad'\] \(.*row 4\): expected uint8 RGB pixels"):
        dataset[2]
    pickle.loads(pickle.dumps(dataset))[1]  # the open HDF5 handle is not pickled (DataLoader workers)
    (tmp_path / "unknown.csv").write_text("G,P,T\nalice/1.jpg,carol/1.jpg,0\n")
    with pytest.raises(KeyError, match=r"unknown.csv, row 2: key 'carol/1.jpg' is not a dataset"):
        PairsDataset.from_csv(tmp_path / "unknown.csv", hdf5=tmp_path / "crops.h5")
    with pytest.raises(ValueError, match="not both"):
        PairsDataset.from_csv(tmp_path / "pairs.csv", root=tmp_path, hdf5=tmp_path / "crops.h5")


def test_pairs_from_lfw_pairs_txt(tmp_path):
    faces = {
        "Abel_Pacheco/Abel_Pacheco_0001.jpg": face(1),
        "Abel_Pacheco/Abel_Pacheco_0004.jpg": face(2),
        "Zico/Zico_0002.jpg": face(3),
        "Zico/Zico_0003.jpg": face(4),
    }
    write_faces(tmp_path / "lfw", faces)
    pairs_txt = tmp_path / "pairs.txt"
    pairs_txt.write_text("2\t1\nAbel_Pacheco\t1\t4\nAbel_Pacheco\t1\tZico\t2\nZico\t2\t3\nZico\t3\tAbel_Pacheco\t4\n")
    dataset = PairsDataset.from_lfw_pairs(pairs_txt, tmp_path / "lfw")
    assert [(item["id"], item["same"]) for item in dataset] == [
        ("pairs/0", True),
        ("pairs/1", False),
        ("pairs/2", True),
        ("pairs/3", False),
    ]
    decoded = np.array(Image.open(tmp_path / "lfw" / "Zico" / "Zico_0003.jpg").convert("RGB"))
    torch.testing.assert_close(dataset[3]["gallery"], torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)
    assert (dataset.pairs[3].gallery, dataset.pairs[3].probe) == (
        "Zico/Zico_0003.jpg",
        "Abel_Pacheco/Abel_Pacheco_0004.jpg",
    )
    (tmp_path / "count.txt").write_text("1\t2\nZico\t2\t3\n")
    with pytest.raises(ValueError, match=r"count.txt: the header promises 4 pairs, found 1"):
        PairsDataset.from_lfw_pairs(tmp_path / "count.txt", tmp_path / "lfw")
    (tmp_path / "fields.txt").write_text("1\nZico\t2\t3\tx\ty\n")
    with pytest.raises(ValueError, match=r"fields.txt, line 2: expected 'name i j'"):
        PairsDataset.from_lfw_pairs(tmp_path / "fields.txt", tmp_path / "lfw")
    (tmp_path / "png.txt").write_text("1\nZico\t2\t3\nZico\t2\tAbel_Pacheco\t1\n")
    with pytest.raises(FileNotFoundError, match=r"png.txt, line 2: image .*Zico_0002.png does not exist"):
        PairsDataset.from_lfw_pairs(tmp_path / "png.txt", tmp_path / "lfw", ext="png")
