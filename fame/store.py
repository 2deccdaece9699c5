"""The on-disk map store: attribution maps of a dataset for many methods, written by many ranks at once.

Layout of ``<path>`` (format 2; the group metadata are zarr v3 ``zarr.json`` files):

    zarr.json                       attrs {"fame_map_store": 2, "num_samples": N, "height": H, "width": W,
                                           "meta": {...}}
    .run.lock                       advisory lock of the explain run writing the store (:meth:`MapStore.claim`)
    <method>/zarr.json              attrs {"settings": {...}, "outputs": [...], "provenance": {...}}
    <entry>/<writer>-<k>.maps       segment: the maps one writer appended, each float16 (H, W) compressed on its own
    <entry>/<writer>.index          one line per written batch: rows, sample ids, stats, and per map its
                                    segment, offset, length and CRC-32, the line prefixed by its own CRC-32

An entry is ``<method>`` (a method without outputs) or ``<method>/<output>`` (e.g. the "similar"
and "dissimilar" maps of face verification). Rows are dataset indices 0..N-1.

Why segments per writer and not zarr sharding: a zarr v3 shard holds many rows in one file and is
rewritten whole by whoever writes one of its rows, so ranks writing interleaved rows (as Lightning's
predict sampler deals them) would overwrite each other's rows or have to wait on a lock. Here every
writer (a process, e.g. one DDP rank) appends only to files it created, so ranks never wait on each
other and never share a file; a writer starts a new segment after ``SEGMENT_MAPS`` maps, which
keeps the file count near 2 per writer per entry (not one per map). A batch's maps are appended to
the segment before its index line is appended, and only rows named by a complete index line exist,
so a process killed mid-write loses only its batches in flight, which read as missing and are
recomputed. A reader merges the index files of every writer once and keeps them on the store object,
reading only what writers appended since, so a batch read costs what it reads, not the store's size.

Integrity: a map is read only when its bytes are where its index line says, of that length and with
that CRC-32; otherwise reading it raises :class:`DamagedMaps` naming the entry, rows and sample ids,
and :meth:`MapStore.discard_damaged` (called by explain.py) marks them missing so they are recomputed.
Unwritten rows have no bytes at all, so nothing (no fill value) can pass for a map.

The root and each method group are built in a staging directory and renamed into place, so a store
or method either exists complete or not at all, also when many ranks create it at once. A store of
format 1 (a zarr array chunk per map) is converted with ``python -m fame.store convert OLD NEW``.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
import warnings
import weakref
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
import zarr
from numcodecs import Blosc

if int(zarr.__version__.split(".")[0]) < 3:
    raise ImportError(f"fame.store needs zarr-python >= 3, found {zarr.__version__}; pip install 'zarr>=3'")

FORMAT_KEY = "fame_map_store"
FORMAT_VERSION = 2
#: The layout with one zarr chunk file per map and per row of ``ids``, ``stats`` and ``done``.
LEGACY_VERSION = 1
STAT_NAMES = ("iterations", "initial_loss", "final_loss")
METHOD_NAME = re.compile(r"[A-Za-z0-9_.\-]+(@[0-9]+)?")
OUTPUT_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
STAGING = ".staging"
LOCK_FILE = ".run.lock"
#: Maps a writer appends to one segment file before it starts the next.
SEGMENT_MAPS = 4096
SEGMENT_SUFFIX = ".maps"
INDEX_SUFFIX = ".index"
#: Each map on its own: byte-shuffled float16 compressed with zstd (blosc), about 1.9x on smooth maps.
CODEC = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE)

PathLike = Union[str, Path]


class StoreError(ValueError):
    """A store that cannot be used as asked; the message is one line saying what to do."""


class StoreMismatch(StoreError):
    """The store holds data made for other settings than the ones requested.

    ``differences`` lists ``(key, stored, requested)`` for every differing (dotted) key.
    """

    def __init__(self, message: str, differences: Sequence[Tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = list(differences)


class DamagedMaps(StoreError):
    """Stored maps whose bytes are missing, cut short or altered (their CRC-32 differs).

    ``entry``, ``rows`` and ``ids`` name them; ``reasons`` maps each row to what was wrong.
    """

    def __init__(self, message: str, entry: str, rows: Sequence[int], ids: Sequence[str], reasons: Mapping[int, str]):
        super().__init__(message)
        self.entry, self.rows, self.ids, self.reasons = entry, list(rows), list(ids), dict(reasons)


class StoreBusy(StoreError):
    """Another run holds the store's run lock (:meth:`MapStore.claim`)."""


class LegacyStore(StoreError):
    """A store of an older layout, which this version reads only through ``python -m fame.store convert``."""


class DamagedIndexWarning(UserWarning):
    """A complete line of an index file fails its checksum; the rows it named read as missing."""


def json_data(value: Any) -> Any:
    """``value`` as JSON data (dicts, lists, str, numbers, bool, None), as it reads back from the store."""

    def convert(item):
        if isinstance(item, Path):
            return str(item)
        if isinstance(item, (np.generic, torch.Tensor)) and np.ndim(item) == 0:
            return item.item()
        if isinstance(item, (set, frozenset)):
            return sorted(item)
        raise TypeError(f"cannot record {type(item).__name__} {item!r} in the map store; pass JSON-like values")

    return json.loads(json.dumps(value, default=convert))


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: Dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


class _Absent:
    """A key one of two compared records lacks."""

    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def differences(stored: Mapping, requested: Mapping) -> List[Tuple[str, Any, Any]]:
    """``(dotted key, stored value, requested value)`` for every leaf where two records differ."""
    left, right = _flatten(dict(stored)), _flatten(dict(requested))
    return [
        (key, left.get(key, _ABSENT), right.get(key, _ABSENT))
        for key in sorted(set(left) | set(right))
        if left.get(key, _ABSENT) != right.get(key, _ABSENT)
    ]


def _method_differences(stored: Mapping, requested: Mapping) -> List[Tuple[str, Any, Any]]:
    """Differences of two method records: their settings (dotted keys), then their outputs."""
    found = differences(stored["settings"], requested["settings"])
    if list(stored["outputs"]) != list(requested["outputs"]):
        found.append(("outputs", list(stored["outputs"]), list(requested["outputs"])))
    return found


def _listing(found: Sequence[Tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {key}: stored {stored!r}, requested {requested!r}" for key, stored, requested in found)


def _read_attributes(directory: Path) -> Optional[Dict]:
    """The attributes of the zarr v3 node in ``directory``; None when it has no readable metadata."""
    try:
        document = json.loads((directory / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    attributes = document.get("attributes") if isinstance(document, dict) else None
    return attributes if isinstance(attributes, dict) else None


def _discard(directory: Path, is_broken) -> None:
    """Move a broken directory aside and delete it; safe when several processes do it at once.

    The rename succeeds for one process only. If what it moved turns out to be complete (another
    process rebuilt it in between), it is put back.
    """
    aside = directory.with_name(f".{directory.name}.discarded-{uuid.uuid4().hex}")
    try:
        os.rename(directory, aside)
    except FileNotFoundError:
        return
    if not is_broken(aside):
        try:
            os.rename(aside, directory)
        except OSError:
            warnings.warn(
                f"{directory} was rebuilt by two processes at once; the second copy is kept at {aside}", stacklevel=2
            )
        return
    shutil.rmtree(aside, ignore_errors=True)


def _move_into_place(staging: Path, target: Path) -> bool:
    """Rename ``staging`` to ``target``; False (and ``staging`` deleted) when ``target`` already exists."""
    try:
        os.rename(staging, target)
        return True
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _as_maps(maps: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().float().cpu().numpy()
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    return maps


def _as_column(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32).reshape(-1)


def _index_line(record: Mapping) -> bytes:
    """One index line: the record's JSON prefixed by the CRC-32 of that JSON."""
    document = json.dumps(record, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(document), document)


def _parse_index_line(line: bytes) -> Optional[Dict]:
    """The record of an index line; None when it fails its checksum or is not a record."""
    checksum, _, document = line.partition(b" ")
    try:
        if int(checksum, 16) != zlib.crc32(document):
            return None
        record = json.loads(document)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


SEGMENT_NAME = re.compile(r"[0-9a-f]{16}-[0-9]+-[0-9a-f]{8}-[0-9]{4}" + re.escape(SEGMENT_SUFFIX))


def _well_formed(record: Dict, num_samples: int) -> bool:
    """Whether an index record names segments of this entry and rows of this store, with one
    offset, length, CRC-32 and stats row per row (the file is data: nothing else is used)."""

    def rows_in_range(values) -> bool:
        return all(isinstance(value, int) and 0 <= value < num_samples for value in values)

    def counts(values) -> bool:
        return all(isinstance(value, int) and value >= 0 for value in values)

    if "discard" in record:
        return isinstance(record["discard"], list) and all(
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and SEGMENT_NAME.fullmatch(item[0])
            and isinstance(item[1], int)
            for item in record["discard"]
        )
    try:
        size = len(record["rows"])
        return (
            isinstance(record["segment"], str)
            and bool(SEGMENT_NAME.fullmatch(record["segment"]))
            and rows_in_range(record["rows"])
            and len(set(record["rows"])) == size
            and all(isinstance(sample_id, str) for sample_id in record["ids"])
            and all(len(record[key]) == size for key in ("ids", "offsets", "lengths", "crc32", "stats"))
            and counts(record["offsets"])
            and counts(record["lengths"])
            and counts(record["crc32"])
            and all(
                isinstance(line, list)
                and len(line) == len(STAT_NAMES)
                and all(value is None or isinstance(value, (int, float)) for value in line)
                for line in record["stats"]
            )
        )
    except (KeyError, TypeError):
        return False


def _has_index_lines(directory: Path) -> bool:
    """Whether any writer finished an index line in ``directory`` or its output directories."""
    for path in list(directory.glob(f"*{INDEX_SUFFIX}")) + list(directory.glob(f"*/*{INDEX_SUFFIX}")):
        try:
            if b"\n" in path.read_bytes():
                return True
        except FileNotFoundError:
            continue
    return False


class _EntryIndex:
    """What the index files of one entry say, merged: per row its segment, offset, length, CRC-32 and stats.

    A row written twice (two runs, or a recompute after damage) reads from the copy with the
    greatest (segment name, offset), i.e. the later writer's. Locations named by a ``discard``
    record are never read.
    """

    def __init__(self, directory: Path, num_samples: int):
        self.directory = directory
        self.num_samples = num_samples
        self.segment = np.full(num_samples, -1, dtype=np.int64)
        self.offset = np.zeros(num_samples, dtype=np.int64)
        self.length = np.zeros(num_samples, dtype=np.int64)
        self.crc = np.zeros(num_samples, dtype=np.int64)
        self.stats = np.full((num_samples, len(STAT_NAMES)), np.nan, dtype=np.float32)
        self.segments: List[str] = []
        self._segment_numbers: Dict[str, int] = {}
        self._consumed: Dict[str, int] = {}
        self.discarded: set = set()

    @property
    def done(self) -> np.ndarray:
        return self.segment >= 0

    def refresh(self, on_ids) -> None:
        """Read what writers appended to the index files since the last refresh."""
        fresh = self._new_records()
        if any("discard" in record for record in fresh):  # rare: rebuild, so that discarded copies give way
            self.__init__(self.directory, self.num_samples)
            fresh = sorted(self._new_records(), key=lambda record: "discard" not in record)
        for record in fresh:
            self.apply(record, on_ids)

    def _new_records(self) -> List[Dict]:
        fresh: List[Dict] = []
        for path in sorted(self.directory.glob(f"*{INDEX_SUFFIX}")):
            start = self._consumed.get(path.name, 0)
            try:
                with open(path, "rb") as file:
                    file.seek(start)
                    data = file.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # an unfinished last line is a batch in flight (or killed mid-write)
            for number, line in enumerate(data[:end].splitlines()):
                record = _parse_index_line(line)
                if record is not None and not _well_formed(record, self.num_samples):
                    record = None
                if record is None:
                    warnings.warn(
                        f"{path}: line {number + 1} after byte {start} fails its checksum or is not an index "
                        "record; the rows it names read as missing and explain.py recomputes them",
                        DamagedIndexWarning,
                        stacklevel=2,
                    )
                    continue
                fresh.append(record)
            self._consumed[path.name] = start + end
        return fresh

    def apply(self, record: Dict, on_ids) -> None:
        if "discard" in record:
            self.discarded.update((segment, int(offset)) for segment, offset in record["discard"])
            return
        name = record["segment"]
        if name not in self._segment_numbers:
            self._segment_numbers[name] = len(self.segments)
            self.segments.append(name)
        number = self._segment_numbers[name]
        rows = np.asarray(record["rows"], dtype=np.int64)
        offsets = np.asarray(record["offsets"], dtype=np.int64)
        keep = np.ones(len(rows), dtype=bool)
        if self.discarded:
            keep = np.array([(name, int(offset)) not in self.discarded for offset in offsets], dtype=bool)
        current = self.segment[rows]
        for k in np.flatnonzero(keep & (current >= 0)):  # a second copy: the later writer's wins
            keep[k] = (name, int(offsets[k])) > (self.segments[current[k]], int(self.offset[rows[k]]))
        rows, chosen = rows[keep], np.flatnonzero(keep)
        self.segment[rows] = number
        self.offset[rows] = offsets[chosen]
        self.length[rows] = np.asarray(record["lengths"], dtype=np.int64)[chosen]
        self.crc[rows] = np.asarray(record["crc32"], dtype=np.int64)[chosen]
        self.stats[rows] = np.asarray(record["stats"], dtype=np.float32).reshape(-1, len(STAT_NAMES))[chosen]
        on_ids(np.asarray(record["rows"], dtype=np.int64), record["ids"])

    def check(self, rows: np.ndarray, keep_bytes: bool) -> Tuple[Dict[int, bytes], Dict[int, str]]:
        """The stored bytes of ``rows`` that pass their checks (when ``keep_bytes``), and what is
        wrong with the others."""
        blobs: Dict[int, bytes] = {}
        damaged: Dict[int, str] = {}
        segments = self.segment[rows]
        for number in np.unique(segments):
            part = rows[segments == number]
            part = part[np.argsort(self.offset[part], kind="stable")]
            name = self.segments[number]
            try:
                file = open(self.directory / name, "rb")
            except FileNotFoundError:
                damaged.update((int(row), f"segment {name} is missing") for row in part)
                continue
            with file:
                size = os.fstat(file.fileno()).st_size
                for row in part.tolist():
                    start, length = int(self.offset[row]), int(self.length[row])
                    if start + length > size:
                        damaged[row] = f"segment {name} is cut short ({size} bytes, the map ends at {start + length})"
                        continue
                    blob = os.pread(file.fileno(), length, start)
                    if zlib.crc32(blob) != int(self.crc[row]):
                        damaged[row] = f"the map's bytes in segment {name} fail their CRC-32"
                        continue
                    if keep_bytes:
                        blobs[row] = blob
        return blobs, damaged


class _Writer:
    """The files one process appends to in one entry directory: its index and its current segment."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.pid = os.getpid()
        self.name = f"{time.time_ns():016x}-{self.pid}-{uuid.uuid4().hex[:8]}"
        self.index = os.open(directory / f"{self.name}{INDEX_SUFFIX}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.segment_number, self.segment, self.segment_name, self.position, self.count = 0, -1, "", 0, 0

    def _next_segment(self) -> None:
        if self.segment >= 0:
            os.close(self.segment)
        self.segment_number += 1
        self.segment_name = f"{self.name}-{self.segment_number:04d}{SEGMENT_SUFFIX}"
        self.segment = os.open(self.directory / self.segment_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.position = self.count = 0

    def append(self, blobs: Sequence[bytes]) -> Tuple[str, List[int]]:
        """Append the maps to the current segment (a new one every ``SEGMENT_MAPS``); their offsets."""
        if self.segment < 0 or self.count + len(blobs) > SEGMENT_MAPS:
            self._next_segment()
        offsets = np.cumsum([0] + [len(blob) for blob in blobs[:-1]]) + self.position
        _write_all(self.segment, b"".join(blobs))
        self.position += sum(len(blob) for blob in blobs)
        self.count += len(blobs)
        return self.segment_name, offsets.tolist()

    def append_index(self, record: Mapping) -> None:
        _write_all(self.index, _index_line(record))

    def close(self) -> None:
        for descriptor in (self.index, self.segment):
            if descriptor >= 0:
                os.close(descriptor)
        self.index = self.segment = -1


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def _close_writers(writers: Dict[str, _Writer]) -> None:
    for writer in writers.values():
        if writer.pid == os.getpid():
            writer.close()
    writers.clear()


class StoreClaim:
    """An exclusive advisory lock (``fcntl.flock``) on a store's ``.run.lock`` for one run's lifetime.

    Held until :meth:`release`, the end of a ``with`` block, or until the object is collected; the
    kernel releases it when the process ends, killed or not, so it never goes stale. Forked
    processes (``ddp_fork`` ranks) share it.
    """

    def __init__(self, path: Path):
        self.path = path
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "a process"
            os.close(descriptor)
            raise StoreBusy(
                f"the map store at {path.parent} is being written by another explain run ({holder}); "
                "wait for it to finish (its rows are then skipped), or write to another store path"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}".encode(), 0)
        self._release = weakref.finalize(self, os.close, descriptor)  # closing the descriptor releases the lock

    def release(self) -> None:
        self._release()

    def __enter__(self) -> StoreClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class MapStore:
    """Attribution maps of one dataset (rows 0..N-1, each with a sample id) for any number of methods."""

    def __init__(self, path: PathLike):
        """Open the existing store at ``path``; :meth:`create_or_open` makes one."""
        self.path = Path(path)
        attributes = _read_attributes(self.path)
        version = attributes.get(FORMAT_KEY) if attributes is not None else None
        if version != FORMAT_VERSION:
            if not self.path.exists():
                raise FileNotFoundError(f"no map store at {self.path}; run explain.py first (it creates the store)")
            if version == LEGACY_VERSION:
                raise LegacyStore(
                    f"{self.path} is a map store of format {LEGACY_VERSION} (a file per map); convert it "
                    f"with: python -m fame.store convert {self.path} NEW_PATH"
                )
            if attributes is not None and "ids" in attributes:
                raise StoreError(
                    f"{self.path} is a map store of an older fame version (no per-method settings or stats); "
                    "rerun explain.py with another store path, or delete it to recompute its maps"
                )
            if version is not None:
                raise StoreError(
                    f"{self.path} is a map store of format {version}, newer than this fame version "
                    f"reads ({FORMAT_VERSION}); update fame"
                )
            raise StoreError(
                f"{self.path} is not a complete map store (its creation was interrupted); "
                "MapStore.create_or_open rebuilds it"
            )
        self.num_samples = int(attributes["num_samples"])
        self.size = (int(attributes["height"]), int(attributes["width"]))
        self.meta: Dict = dict(attributes.get("meta") or {})
        self._ids = np.full(self.num_samples, "", dtype=object)
        self._row_of: Dict[str, int] = {}
        self._indexes: Dict[str, _EntryIndex] = {}
        self._writers: Dict[str, _Writer] = {}
        weakref.finalize(self, _close_writers, self._writers)

    @classmethod
    def create_or_open(
        cls, path: PathLike, num_samples: int, size: Sequence[int], meta: Optional[Mapping] = None
    ) -> MapStore:
        """Open the store at ``path``, creating it for ``num_samples`` rows of (H, W) maps if absent.

        Safe when many ranks call it at once: each builds a store in a staging directory and renames
        it into place; the losers open the winner's. A store whose creation was interrupted is
        rebuilt. An existing store with another row count, map size or ``meta`` raises
        :class:`StoreMismatch` naming the differences (``meta=None`` skips the ``meta`` check).
        """
        path = Path(path)
        requested = {"num_samples": int(num_samples), "height": int(size[0]), "width": int(size[1])}
        if requested["num_samples"] < 1 or min(requested["height"], requested["width"]) < 1:
            raise ValueError(
                f"a map store needs at least one row and a positive map size, got {num_samples} rows of {tuple(size)}"
            )
        meta = json_data(dict(meta)) if meta is not None else None
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            attributes = _read_attributes(path)
            if attributes is not None and (FORMAT_KEY in attributes or "ids" in attributes):
                store = cls(path)
                store._check(requested, meta)
                return store
            if path.exists():
                _discard(path, lambda directory: not {FORMAT_KEY, "ids"} & set(_read_attributes(directory) or {}))
            staging = path.with_name(f".{path.name}.staging-{uuid.uuid4().hex}")
            zarr.open_group(
                str(staging),
                mode="w-",
                zarr_format=3,
                attributes={FORMAT_KEY: FORMAT_VERSION, **requested, "meta": meta or {}, "created": _now()},
            )
            if _move_into_place(staging, path):
                return cls(path)

    def _check(self, requested: Mapping, meta: Optional[Dict]) -> None:
        stored = {"num_samples": self.num_samples, "height": self.size[0], "width": self.size[1]}
        if meta is not None:
            stored, requested = {**stored, "meta": self.meta}, {**requested, "meta": meta}
        found = differences(stored, requested)
        if found:
            raise StoreMismatch(
                f"the map store at {self.path} was made for other data:\n{_listing(found)}\n"
                "Write these maps to another store path, or delete this store to start over.",
                found,
            )

    def claim(self) -> StoreClaim:
        """Take the store's run lock for this process (and its forks) or raise :class:`StoreBusy`
        naming the holder; explain.py holds it while it writes, so a second run is refused."""
        return StoreClaim(self.path / LOCK_FILE)

    # ---- methods -------------------------------------------------------------------------------

    def _method_attributes(self, name: str) -> Optional[Dict]:
        attributes = _read_attributes(self.path / name)
        return attributes if attributes is not None and "settings" in attributes else None

    @property
    def methods(self) -> List[str]:
        """Names of the methods begun in this store (``begin_method``), sorted."""
        return sorted(
            entry.name
            for entry in self.path.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and self._method_attributes(entry.name)
        )

    def outputs(self, method: str) -> List[str]:
        """The entries (readable map arrays) of ``method``: ``[method]``, or ``method/<output>`` per output."""
        attributes = self._method_attributes(method)
        if attributes is None:
            raise KeyError(f"no method {method!r} in the map store at {self.path}; it holds {self.methods}")
        return [method if output == "" else f"{method}/{output}" for output in attributes["outputs"]]

    @property
    def entries(self) -> List[str]:
        """Every readable map array of every method, e.g. ``["fame/dissimilar", "fame/similar", "gradcam"]``."""
        return [entry for method in self.methods for entry in self.outputs(method)]

    def method_settings(self, name: str) -> Dict:
        """The settings ``name`` (a method or one of its entries) was begun with."""
        return self._method_record(name)["settings"]

    def method_provenance(self, name: str) -> Dict:
        """What the run that began ``name`` recorded about itself (checkpoint path, environment...)."""
        return self._method_record(name)["provenance"]

    def _method_record(self, name: str) -> Dict:
        method = name.split("/")[0]
        attributes = self._method_attributes(method)
        if attributes is None:
            raise KeyError(f"no method {method!r} in the map store at {self.path}; it holds {self.methods}")
        return attributes

    def begin_method(
        self,
        name: str,
        settings: Mapping,
        *,
        outputs: Sequence[str] = ("",),
        new_group: bool = False,
        provenance: Optional[Mapping] = None,
    ) -> str:
        """Start (or resume) writing maps of method ``name`` made with ``settings``; returns the name to write to.

        ``settings`` is everything the maps depend on (explainer options, data config, checkpoint
        digest, package version...): a resumed run must pass the same, or :class:`StoreMismatch`
        lists every differing key. Settings bind the method once a map of it is written: a method
        without any written map (its run failed before writing) is replaced without asking. With
        ``new_group=True`` the maps go to the first of ``name@2``, ``name@3``... that is new, holds
        these settings or has no maps. ``outputs`` names the maps the method makes per sample ("" for
        one map). ``provenance`` (environment, checkpoint path, git commit...) is recorded by the run
        that creates the method and never compared. Safe when many ranks call it at once.
        """
        if not METHOD_NAME.fullmatch(name):
            raise ValueError(
                f"method name {name!r} must consist of letters, digits, '_', '.', '-' (and an '@<n>' suffix)"
            )
        outputs = [str(output) for output in outputs]
        if (
            not outputs
            or len(set(outputs)) != len(outputs)
            or ("" in outputs and len(outputs) > 1)
            or not all(output == "" or OUTPUT_NAME.fullmatch(output) for output in outputs)
        ):
            raise ValueError(f"outputs must be [''] or distinct names of letters, digits, '_', '.', '-'; got {outputs}")
        requested = {"settings": json_data(dict(settings)), "outputs": outputs}
        base, candidate, number = name.split("@")[0], name, 1
        while True:
            stored = self._method_attributes(candidate) or self._create_method(candidate, requested, provenance)
            found = _method_differences(stored, requested)
            if not found:
                return candidate
            if not _has_index_lines(self.path / candidate):  # unbound: no map written with the stored settings
                self._forget(candidate)
                _discard(
                    self.path / candidate,
                    lambda directory: (
                        not _has_index_lines(directory)
                        and _method_differences(
                            _read_attributes(directory) or {"settings": None, "outputs": None}, requested
                        )
                    ),
                )
                continue
            if not new_group:
                following = self._next_group(base, requested)
                raise StoreMismatch(
                    f"the map store at {self.path} holds maps of {candidate!r} made with other settings:\n"
                    f"{_listing(found)}\nThese maps would be stale for this run. Write to another store path, "
                    f"or pass new_group=True to keep both (this run then writes to {following!r}), "
                    f"or delete {self.path / candidate} to recompute it.",
                    found,
                )
            number += 1
            candidate = f"{base}@{number}"

    def _next_group(self, base: str, requested: Dict) -> str:
        number = 2
        while True:
            stored = self._method_attributes(f"{base}@{number}")
            if (
                stored is None
                or not _method_differences(stored, requested)
                or not _has_index_lines(self.path / f"{base}@{number}")
            ):
                return f"{base}@{number}"
            number += 1

    def _create_method(self, name: str, requested: Dict, provenance: Optional[Mapping]) -> Dict:
        """Build the method's group in staging and rename it into place; the record that ends up there."""
        target = self.path / name
        if target.exists():  # a directory without settings: not made by begin_method, or damaged
            _discard(target, lambda directory: "settings" not in (_read_attributes(directory) or {}))
        staging_root = self.path / STAGING
        staging_root.mkdir(exist_ok=True)
        staging = staging_root / f"{name}-{uuid.uuid4().hex}"
        attributes = {**requested, "provenance": json_data(dict(provenance or {})), "created": _now()}
        group = zarr.open_group(str(staging), mode="w-", zarr_format=3, attributes=attributes)
        for output in requested["outputs"]:
            if output != "":
                group.create_group(output)
        _move_into_place(staging, target)
        stored = self._method_attributes(name)
        if stored is None:
            raise RuntimeError(f"method {name!r} vanished from {self.path} while it was being created")
        return stored

    def _forget(self, method: str) -> None:
        """Drop what this object cached about ``method`` (it is being replaced)."""
        for entry in [entry for entry in self._indexes if entry.split("/")[0] == method]:
            del self._indexes[entry]
        for entry in [entry for entry in self._writers if entry.split("/")[0] == method]:
            self._writers.pop(entry).close()

    # ---- rows ------------------------------------------------------------------------------------

    def _index(self, entry: str, refresh: bool = True) -> _EntryIndex:
        if entry not in self._indexes:
            method = entry.split("/")[0]
            if entry not in self.outputs(method):
                raise KeyError(f"no maps {entry!r} in the map store at {self.path}; it holds {self.entries}")
            self._indexes[entry] = _EntryIndex(self.path / entry, self.num_samples)
        elif not refresh:
            return self._indexes[entry]
        self._indexes[entry].refresh(self._learn_ids)
        return self._indexes[entry]

    def _learn_ids(self, rows: np.ndarray, ids: Sequence[str]) -> None:
        for row, sample_id in zip(rows.tolist(), ids):
            if self._ids[row] == "":
                self._ids[row] = sample_id
                self._row_of[sample_id] = row

    def _refresh_all(self) -> None:
        for entry in self.entries:
            self._index(entry)

    @property
    def ids(self) -> List[str]:
        """Sample ids of the rows written so far, in row order (all N once a method is complete)."""
        self._refresh_all()
        return [sample_id for sample_id in self._ids if sample_id != ""]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of sample ``ids``; an id that was never written is an error."""
        ids = [str(sample_id) for sample_id in ids]
        if any(sample_id not in self._row_of for sample_id in ids):
            self._refresh_all()
        try:
            return np.array([self._row_of[sample_id] for sample_id in ids], dtype=np.int64)
        except KeyError as error:
            raise KeyError(f"sample id {error.args[0]!r} was never written to the map store at {self.path}") from None

    def completed(self, entry: str) -> np.ndarray:
        """Boolean (N,): which rows of ``entry`` have a map written (:meth:`read` checks it is intact)."""
        return self._index(entry).done.copy()

    def missing_rows(self, entry: str) -> np.ndarray:
        """Rows (sorted) without a map of ``entry`` (a method name covers all of its outputs)."""
        entries = self.outputs(entry) if "/" not in entry else [entry]
        done = np.logical_and.reduce([self.completed(name) for name in entries])
        return np.flatnonzero(~done)

    def write(
        self,
        entry: str,
        rows: Sequence[int],
        ids: Sequence[str],
        maps: Union[torch.Tensor, np.ndarray],
        stats: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Store maps (B, 1, H, W) or (B, H, W) of dataset ``rows`` with sample ``ids`` as float16.

        ``stats`` maps some of ``iterations``, ``initial_loss``, ``final_loss`` to (B,) values
        (e.g. a :class:`fame.FameStats`' fields). A row keeps the id it was first written with;
        another id for it means the dataset changed, which is an error. The maps go to this
        process's own segment file, then their index line to its own index file, so a kill
        between the two leaves the rows missing, never half written.
        """
        index = self._index(entry, refresh=False)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        ids = [str(sample_id) for sample_id in ids]
        maps = _as_maps(maps)
        if len(ids) != len(rows) or maps.shape != (len(rows), *self.size):
            raise ValueError(
                f"write {len(rows)} rows with as many ids and maps of shape "
                f"({len(rows)}, 1, {self.size[0]}, {self.size[1]}); got {len(ids)} ids and maps {maps.shape}"
            )
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.num_samples or len(np.unique(rows)) != len(rows):
            raise ValueError(f"rows must be distinct dataset indices in [0, {self.num_samples}), got {rows.tolist()}")
        half = torch.from_numpy(np.ascontiguousarray(maps)).half().numpy()  # as numpy's cast, several times faster
        broken = ~np.isfinite(half).all(axis=(1, 2))
        if broken.any():
            raise ValueError(
                f"{entry}: maps of {[ids[i] for i in np.flatnonzero(broken)[:5]]} are not finite "
                "(NaN, Inf, or beyond float16's range); fix the explainer's input or settings"
            )
        stats = {name: _as_column(values) for name, values in (stats or {}).items()}
        if set(stats) - set(STAT_NAMES) or any(len(values) != len(rows) for values in stats.values()):
            raise ValueError(
                f"stats must map some of {list(STAT_NAMES)} to {len(rows)} values each, got "
                f"{ {name: len(values) for name, values in stats.items()} }"
            )
        table = np.full((len(rows), len(STAT_NAMES)), np.nan, dtype=np.float32)
        for column, stat_name in enumerate(STAT_NAMES):
            if stat_name in stats:
                table[:, column] = stats[stat_name]
        self._check_ids(rows, ids)
        blobs = [CODEC.encode(np.ascontiguousarray(one)) for one in half]
        writer = self._writers.get(entry)
        if writer is None or writer.pid != os.getpid():  # a forked process writes files of its own
            writer = self._writers[entry] = _Writer(self.path / entry)
        segment, offsets = writer.append(blobs)
        record = {
            "segment": segment,
            "rows": rows.tolist(),
            "ids": ids,
            "offsets": offsets,
            "lengths": [len(blob) for blob in blobs],
            "crc32": [zlib.crc32(blob) for blob in blobs],
            "stats": [[None if np.isnan(value) else float(value) for value in line] for line in table.tolist()],
        }
        writer.append_index(record)
        index.refresh(self._learn_ids)

    def _check_ids(self, rows: np.ndarray, ids: List[str]) -> None:
        if any(self._ids[row] == "" for row in rows.tolist()):
            self._refresh_all()
        for row, sample_id in zip(rows.tolist(), ids):
            known = self._ids[row]
            if known not in ("", sample_id):
                raise ValueError(
                    f"row {row} of the map store at {self.path} holds sample {known!r}, not {sample_id!r}: "
                    "the dataset's order or content changed since the store was made; use another store path"
                )

    def read(self, entry: str, ids: Optional[Sequence[str]] = None) -> np.ndarray:
        """Maps (n, H, W) as float32 of sample ``ids`` (default: every row).

        A map never written is an error; one whose bytes are missing, cut short or fail their
        CRC-32 raises :class:`DamagedMaps` naming the entry, rows and ids.
        """
        index = self._index(entry, refresh=False)
        rows = np.arange(self.num_samples) if ids is None else self.rows(ids)
        if not index.done[rows].all():
            index = self._index(entry)
        done = index.done[rows]
        if not done.all():
            raise ValueError(
                f"{int((~done).sum())} requested maps of {entry!r} were never written "
                f"(rows {rows[~done][:5].tolist()}...); "
                "rerun explain.py, which resumes where it stopped"
            )
        blobs, damaged = index.check(rows, keep_bytes=True)
        if damaged:
            raise self._damaged(entry, damaged)
        result = np.empty((len(rows), *self.size), dtype=np.float32)
        for position, row in enumerate(rows.tolist()):
            result[position] = np.frombuffer(CODEC.decode(blobs[row]), dtype=np.float16).reshape(self.size)
        return result

    def _damaged(self, entry: str, damaged: Mapping[int, str]) -> DamagedMaps:
        rows = sorted(damaged)
        ids = [self._ids[row] for row in rows]
        reasons = sorted(set(damaged.values()))
        return DamagedMaps(
            f"{entry}: {len(rows)} stored maps are damaged and not read: rows {rows[:5]}, ids {ids[:5]}"
            f"{' ...' if len(rows) > 5 else ''} ({'; '.join(reasons[:3])}); rerun explain.py, which recomputes them",
            entry,
            rows,
            ids,
            damaged,
        )

    def verify(self, entry: str) -> Dict[int, str]:
        """Every written row of ``entry`` whose map bytes are missing, cut short or fail their CRC-32,
        with what is wrong; reads every map's bytes (no decoding)."""
        index = self._index(entry)
        return index.check(np.flatnonzero(index.done), keep_bytes=False)[1]

    def discard_damaged(self, entry: str) -> List[str]:
        """Mark the damaged maps of ``entry`` (:meth:`verify`) as missing, so explain.py recomputes
        them; the sample ids of those rows."""
        damaged = self.verify(entry)
        if not damaged:
            return []
        index = self._index(entry, refresh=False)
        rows = sorted(damaged)
        record = {"discard": [[index.segments[index.segment[row]], int(index.offset[row])] for row in rows]}
        writer = self._writers.get(entry)
        if writer is None or writer.pid != os.getpid():
            writer = self._writers[entry] = _Writer(self.path / entry)
        writer.append_index(record)
        self._index(entry)
        return [self._ids[row] for row in rows]

    def read_stats(self, entry: str) -> pd.DataFrame:
        """Per-sample statistics of the written rows of ``entry``: columns id, iterations,
        initial_loss, final_loss (NaN where the method records none), indexed by row."""
        index = self._index(entry)
        rows = np.flatnonzero(index.done)
        frame = pd.DataFrame(index.stats[rows], columns=list(STAT_NAMES), index=pd.Index(rows, name="row"))
        frame.insert(0, "id", self._ids[rows].tolist() if len(rows) else [])
        return frame

    def close(self) -> None:
        """Close the files this process writes to (done anyway when the store object is collected)."""
        _close_writers(self._writers)

    def __repr__(self) -> str:
        return f"MapStore({str(self.path)!r}, rows={self.num_samples}, size={self.size}, methods={self.methods})"


def convert(old: PathLike, new: PathLike, rows_per_step: int = 256) -> MapStore:
    """Copy a store of format 1 (a zarr chunk per map) into a new store of this format at ``new``:
    the same rows, sample ids, methods (settings, outputs, provenance), maps and statistics."""
    old = Path(old)
    attributes = _read_attributes(old)
    if attributes is None or attributes.get(FORMAT_KEY) != LEGACY_VERSION:
        raise StoreError(f"{old} is not a map store of format {LEGACY_VERSION}; nothing to convert")
    if Path(new).exists():
        raise StoreError(f"{new} exists; convert into a new path")
    source = zarr.open_group(str(old), mode="r", zarr_format=3)
    size = (int(attributes["height"]), int(attributes["width"]))
    target = MapStore.create_or_open(new, int(attributes["num_samples"]), size, meta=attributes.get("meta") or {})
    ids = np.array([str(sample_id) for sample_id in np.asarray(source["ids"][:]).astype(object)], dtype=object)
    for method in sorted(entry.name for entry in old.iterdir() if entry.is_dir() and not entry.name.startswith(".")):
        record = _read_attributes(old / method)
        if record is None or "settings" not in record:
            continue
        target.begin_method(method, record["settings"], outputs=record["outputs"], provenance=record.get("provenance"))
        for entry in target.outputs(method):
            done = np.flatnonzero(np.asarray(source[f"{entry}/done"][:], dtype=bool))
            for start in range(0, len(done), rows_per_step):
                rows = done[start : start + rows_per_step]
                stats = np.asarray(source[f"{entry}/stats"].oindex[rows, :], dtype=np.float32)
                target.write(
                    entry,
                    rows,
                    ids[rows].tolist(),
                    np.asarray(source[f"{entry}/maps"].oindex[rows]),
                    stats={name: stats[:, k] for k, name in enumerate(STAT_NAMES)},
                )
    target.close()
    return target


def main(arguments: Optional[Sequence[str]] = None) -> int:
    """``python -m fame.store convert OLD NEW``: convert a store of format 1 into a new one."""
    parser = argparse.ArgumentParser(prog="python -m fame.store", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    converting = commands.add_parser("convert", help=f"copy a store of format {LEGACY_VERSION} into a new store")
    converting.add_argument("old")
    converting.add_argument("new")
    options = parser.parse_args(arguments)
    try:
        store = convert(options.old, options.new)
    except (StoreError, FileNotFoundError) as error:
        print(f"python -m fame.store: {error}", file=sys.stderr)
        return 2
    print(f"converted {options.old} into {store.path}: {store.num_samples} rows, entries {store.entries}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
