"""The on-disk map store: attribution maps of a dataset for many methods, written by many ranks at once.

Layout of ``<path>`` (a zarr v3 group; needs zarr-python >= 3):

    zarr.json            attrs {"fame_map_store": 1, "num_samples": N, "height": H, "width": W, "meta": {...}}
    ids                  string (N,): the sample id of each dataset row, "" until a row is first written
    <method>/            attrs {"settings": {...}, "outputs": [...], "provenance": {...}}
    <method>[/<output>]/maps    float16 (N, H, W)
    <method>[/<output>]/stats   float32 (N, 3): iterations, initial_loss, final_loss (NaN: not recorded)
    <method>[/<output>]/done    bool (N,): set after the row's id, map and stats are on disk

Rows are dataset indices 0..N-1 and every array has one chunk per row, so ranks writing different
rows never touch the same file; zarr replaces each chunk file atomically, and ``done`` is written
last, so a process killed mid-write leaves rows that read as missing, never half-written ones.
The root and each method group are built in a staging directory and renamed into place, so a
store or method either exists complete or not at all, also when many ranks create it at once.
A method without outputs keeps its arrays in ``<method>/``; one with outputs (e.g. "similar" and
"dissimilar" of face verification) has an entry ``<method>/<output>`` per output.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
import zarr

if int(zarr.__version__.split(".")[0]) < 3:
    raise ImportError(f"fame.store needs zarr-python >= 3, found {zarr.__version__}; pip install 'zarr>=3'")

FORMAT_KEY = "fame_map_store"
FORMAT_VERSION = 1
STAT_NAMES = ("iterations", "initial_loss", "final_loss")
METHOD_NAME = re.compile(r"[A-Za-z0-9_.\-]+(@[0-9]+)?")
OUTPUT_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
STAGING = ".staging"

PathLike = Union[str, Path]


class StoreMismatch(ValueError):
    """The store holds data made for other settings than the ones requested.

    ``differences`` lists ``(key, stored, requested)`` for every differing (dotted) key.
    """

    def __init__(self, message: str, differences: Sequence[Tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = list(differences)


def plain(value: Any) -> Any:
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
    return [(key, left.get(key, _ABSENT), right.get(key, _ABSENT))
            for key in sorted(set(left) | set(right)) if left.get(key, _ABSENT) != right.get(key, _ABSENT)]


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
            warnings.warn(f"{directory} was rebuilt by two processes at once; the second copy is kept at {aside}")
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


class MapStore:
    """Attribution maps of one dataset (rows 0..N-1, each with a sample id) for any number of methods."""

    def __init__(self, path: PathLike):
        """Open the existing store at ``path``; :meth:`create_or_open` makes one."""
        self.path = Path(path)
        attributes = _read_attributes(self.path)
        if attributes is None or attributes.get(FORMAT_KEY) != FORMAT_VERSION:
            if not self.path.exists():
                raise FileNotFoundError(f"no map store at {self.path}; run explain.py first (it creates the store)")
            if attributes is not None and "ids" in attributes:
                raise ValueError(
                    f"{self.path} is a map store of an older fame version (no per-method settings or stats); "
                    "rerun explain.py with another store path, or delete it to recompute its maps"
                )
            raise ValueError(f"{self.path} is not a complete map store (its creation was interrupted); "
                             "MapStore.create_or_open rebuilds it")
        self._group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        self.num_samples = int(attributes["num_samples"])
        self.size = (int(attributes["height"]), int(attributes["width"]))
        self.meta: Dict = dict(attributes.get("meta") or {})
        self._ids = self._group["ids"]
        self._arrays: Dict[str, Tuple[Any, Any, Any]] = {}
        self._known_ids: Dict[int, str] = {}

    @classmethod
    def create_or_open(cls, path: PathLike, num_samples: int, size: Sequence[int], meta: Optional[Mapping] = None) -> "MapStore":
        """Open the store at ``path``, creating it for ``num_samples`` rows of (H, W) maps if absent.

        Safe when many ranks call it at once: each builds a store in a staging directory and renames
        it into place; the losers open the winner's. A store whose creation was interrupted is
        rebuilt. An existing store with another row count, map size or ``meta`` raises
        :class:`StoreMismatch` naming the differences (``meta=None`` skips the ``meta`` check).
        """
        path = Path(path)
        requested = {"num_samples": int(num_samples), "height": int(size[0]), "width": int(size[1])}
        if requested["num_samples"] < 1 or min(requested["height"], requested["width"]) < 1:
            raise ValueError(f"a map store needs at least one row and a positive map size, got {num_samples} rows of {tuple(size)}")
        meta = plain(dict(meta)) if meta is not None else None
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            attributes = _read_attributes(path)
            if attributes is not None and (attributes.get(FORMAT_KEY) == FORMAT_VERSION or "ids" in attributes):
                store = cls(path)
                store._check(requested, meta)
                return store
            if path.exists():
                _discard(path, lambda directory: (_read_attributes(directory) or {}).get(FORMAT_KEY) != FORMAT_VERSION)
            staging = path.with_name(f".{path.name}.staging-{uuid.uuid4().hex}")
            group = zarr.open_group(str(staging), mode="w-", zarr_format=3, attributes={
                FORMAT_KEY: FORMAT_VERSION, **requested, "meta": meta or {}, "created": _now()})
            group.create_array("ids", shape=(requested["num_samples"],), chunks=(1,), dtype=str, fill_value="")
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
                "Write these maps to another store path, or delete this store to start over.", found)

    # ---- methods -------------------------------------------------------------------------------

    def _method_attributes(self, name: str) -> Optional[Dict]:
        attributes = _read_attributes(self.path / name)
        return attributes if attributes is not None and "settings" in attributes else None

    @property
    def methods(self) -> List[str]:
        """Names of the methods begun in this store (``begin_method``), sorted."""
        return sorted(entry.name for entry in self.path.iterdir()
                      if entry.is_dir() and not entry.name.startswith(".") and self._method_attributes(entry.name))

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

    def begin_method(self, name: str, settings: Mapping, *, outputs: Sequence[str] = ("",),
                     new_group: bool = False, provenance: Optional[Mapping] = None) -> str:
        """Start (or resume) writing maps of method ``name`` made with ``settings``; returns the name to write to.

        ``settings`` is everything the maps depend on (explainer options, data config, checkpoint
        digest, package version...): a resumed run must pass the same, or :class:`StoreMismatch`
        lists every differing key. With ``new_group=True`` the maps go to the first of
        ``name@2``, ``name@3``... that is new or holds these settings. ``outputs`` names the maps
        the method makes per sample ("" for one map). ``provenance`` (environment, checkpoint path,
        git commit...) is recorded by the run that creates the method and never compared.
        Safe when many ranks call it at once.
        """
        if not METHOD_NAME.fullmatch(name):
            raise ValueError(f"method name {name!r} must consist of letters, digits, '_', '.', '-' (and an '@<n>' suffix)")
        outputs = [str(output) for output in outputs]
        if not outputs or len(set(outputs)) != len(outputs) or ("" in outputs and len(outputs) > 1) \
                or not all(output == "" or OUTPUT_NAME.fullmatch(output) for output in outputs):
            raise ValueError(f"outputs must be [''] or distinct names of letters, digits, '_', '.', '-'; got {outputs}")
        requested = {"settings": plain(dict(settings)), "outputs": outputs}
        base, candidate, number = name.split("@")[0], name, 1
        while True:
            stored = self._method_attributes(candidate) or self._create_method(candidate, requested, provenance)
            found = _method_differences(stored, requested)
            if not found:
                return candidate
            if not new_group:
                following = self._next_group(base, requested)
                raise StoreMismatch(
                    f"the map store at {self.path} holds maps of {candidate!r} made with other settings:\n"
                    f"{_listing(found)}\nThese maps would be stale for this run. Write to another store path, "
                    f"or pass new_group=True to keep both (this run then writes to {following!r}), "
                    f"or delete {self.path / candidate} to recompute it.", found)
            number += 1
            candidate = f"{base}@{number}"

    def _next_group(self, base: str, requested: Dict) -> str:
        number = 2
        while True:
            stored = self._method_attributes(f"{base}@{number}")
            if stored is None or not _method_differences(stored, requested):
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
        attributes = {**requested, "provenance": plain(dict(provenance or {})), "created": _now()}
        group = zarr.open_group(str(staging), mode="w-", zarr_format=3, attributes=attributes)
        count, (height, width) = self.num_samples, self.size
        for output in requested["outputs"]:
            node = group if output == "" else group.create_group(output)
            node.create_array("maps", shape=(count, height, width), chunks=(1, height, width), dtype="float16", fill_value=0)
            node.create_array("stats", shape=(count, len(STAT_NAMES)), chunks=(1, len(STAT_NAMES)),
                              dtype="float32", fill_value=float("nan"), attributes={"columns": list(STAT_NAMES)})
            node.create_array("done", shape=(count,), chunks=(1,), dtype="bool", fill_value=False)
        _move_into_place(staging, target)
        stored = self._method_attributes(name)
        if stored is None:
            raise RuntimeError(f"method {name!r} vanished from {self.path} while it was being created")
        return stored

    # ---- rows ------------------------------------------------------------------------------------

    def _entry_arrays(self, entry: str):
        if entry not in self._arrays:
            method, _, output = entry.partition("/")
            if entry not in self.outputs(method):
                raise KeyError(f"no maps {entry!r} in the map store at {self.path}; it holds {self.entries}")
            self._arrays[entry] = tuple(self._group[f"{entry}/{array}"] for array in ("maps", "stats", "done"))
        return self._arrays[entry]

    def _row_ids(self) -> np.ndarray:
        return np.asarray(self._ids[:]).astype(object)

    @property
    def ids(self) -> List[str]:
        """Sample ids of the rows written so far, in row order (all N once a method is complete)."""
        return [sample_id for sample_id in self._row_ids() if sample_id != ""]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of sample ``ids``; an id that was never written is an error."""
        lookup = {sample_id: row for row, sample_id in enumerate(self._row_ids()) if sample_id != ""}
        try:
            return np.array([lookup[str(sample_id)] for sample_id in ids], dtype=np.int64)
        except KeyError as error:
            raise KeyError(f"sample id {error.args[0]!r} was never written to the map store at {self.path}") from None

    def completed(self, entry: str) -> np.ndarray:
        """Boolean (N,): which rows have their map of ``entry`` on disk."""
        return np.asarray(self._entry_arrays(entry)[2][:], dtype=bool)

    def missing_rows(self, entry: str) -> np.ndarray:
        """Rows (sorted) without a map of ``entry`` (a method name covers all of its outputs)."""
        entries = self.outputs(entry) if "/" not in entry else [entry]
        done = np.logical_and.reduce([self.completed(name) for name in entries])
        return np.flatnonzero(~done)

    def write(self, entry: str, rows: Sequence[int], ids: Sequence[str], maps: Union[torch.Tensor, np.ndarray],
              stats: Optional[Mapping[str, Any]] = None) -> None:
        """Store maps (B, 1, H, W) or (B, H, W) of dataset ``rows`` with sample ``ids`` as float16, then mark them done.

        ``stats`` maps some of ``iterations``, ``initial_loss``, ``final_loss`` to (B,) values
        (e.g. a :class:`fame.FameStats`' fields). A row keeps the id it was first written with;
        another id for it means the dataset changed, which is an error.
        """
        maps_array, stats_array, done_array = self._entry_arrays(entry)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        ids = [str(sample_id) for sample_id in ids]
        maps = _as_maps(maps)
        if len(ids) != len(rows) or maps.shape != (len(rows), *self.size):
            raise ValueError(f"write {len(rows)} rows with as many ids and maps of shape "
                             f"({len(rows)}, 1, {self.size[0]}, {self.size[1]}); got {len(ids)} ids and maps {maps.shape}")
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.num_samples or len(np.unique(rows)) != len(rows):
            raise ValueError(f"rows must be distinct dataset indices in [0, {self.num_samples}), got {rows.tolist()}")
        half = maps.astype(np.float16)
        broken = ~np.isfinite(half).all(axis=(1, 2))
        if broken.any():
            raise ValueError(f"{entry}: maps of {[ids[i] for i in np.flatnonzero(broken)[:5]]} are not finite "
                             "(NaN, Inf, or beyond float16's range); fix the explainer's input or settings")
        stats = {name: _as_column(values) for name, values in (stats or {}).items()}
        if set(stats) - set(STAT_NAMES) or any(len(values) != len(rows) for values in stats.values()):
            raise ValueError(f"stats must map some of {list(STAT_NAMES)} to {len(rows)} values each, got "
                             f"{ {name: len(values) for name, values in stats.items()} }")
        table = np.full((len(rows), len(STAT_NAMES)), np.nan, dtype=np.float32)
        for column, stat_name in enumerate(STAT_NAMES):
            if stat_name in stats:
                table[:, column] = stats[stat_name]
        order = np.argsort(rows)
        rows, half, table = rows[order], half[order], table[order]
        ids = [ids[i] for i in order]
        self._record_ids(rows, ids)
        maps_array.oindex[rows] = half
        stats_array.oindex[rows, :] = table
        done_array.oindex[rows] = True

    def _record_ids(self, rows: np.ndarray, ids: List[str]) -> None:
        if all(self._known_ids.get(int(row)) == sample_id for row, sample_id in zip(rows, ids)):
            return  # written or checked by this process already (e.g. for another method)
        stored = np.asarray(self._ids.oindex[rows]).astype(object)
        for row, known, sample_id in zip(rows, stored, ids):
            if known not in ("", sample_id):
                raise ValueError(
                    f"row {row} of the map store at {self.path} holds sample {known!r}, not {sample_id!r}: "
                    "the dataset's order or content changed since the store was made; use another store path"
                )
        new = stored == ""
        if new.any():
            self._ids.oindex[rows[new]] = np.array([sample_id for sample_id, fresh in zip(ids, new) if fresh])
        self._known_ids.update((int(row), sample_id) for row, sample_id in zip(rows, ids))

    def read(self, entry: str, ids: Optional[Sequence[str]] = None) -> np.ndarray:
        """Maps (n, H, W) as float32 of sample ``ids`` (default: every row); a map never written is an error."""
        maps_array, _, done_array = self._entry_arrays(entry)
        rows = np.arange(self.num_samples) if ids is None else self.rows(ids)
        done = np.asarray(done_array[:], dtype=bool)[rows]
        if not done.all():
            raise ValueError(
                f"{int((~done).sum())} requested maps of {entry!r} were never written (rows {rows[~done][:5].tolist()}...); "
                "rerun explain.py, which resumes where it stopped"
            )
        if len(rows) == 0:
            return np.zeros((0, *self.size), dtype=np.float32)
        return np.asarray(maps_array[:] if ids is None else maps_array.oindex[rows], dtype=np.float32)

    def read_stats(self, entry: str) -> pd.DataFrame:
        """Per-sample statistics of the written rows of ``entry``: columns id, iterations,
        initial_loss, final_loss (NaN where the method records none), indexed by row."""
        _, stats_array, done_array = self._entry_arrays(entry)
        rows = np.flatnonzero(np.asarray(done_array[:], dtype=bool))
        table = np.asarray(stats_array.oindex[rows, :], dtype=np.float32) if len(rows) else np.zeros((0, len(STAT_NAMES)), np.float32)
        frame = pd.DataFrame(table, columns=list(STAT_NAMES), index=pd.Index(rows, name="row"))
        frame.insert(0, "id", self._row_ids()[rows] if len(rows) else [])
        return frame

    def __repr__(self) -> str:
        return f"MapStore({str(self.path)!r}, rows={self.num_samples}, size={self.size}, methods={self.methods})"
