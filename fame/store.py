"""The on-disk map store: one chunked zarr array of maps per method, addressed by sample id.

Layout of ``<path>`` (a zarr group, format v3 with zarr-python 3, v2 with zarr-python 2):

    attrs: {"ids": [sample ids in row order], "height": H, "width": W, "meta": {...}}
    <method>/maps   float (N, H, W), one chunk per sample
    <method>/done   bool (N,), one chunk per sample

Each sample has its own chunks, so ranks writing different samples never touch the same file,
and a run stopped half way resumes with ``missing(method)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
import zarr


class MapStore:
    """Attribution maps of one set of samples, for any number of methods."""

    def __init__(self, path: Union[str, Path], ids: Optional[Sequence[str]] = None,
                 size: Optional[Sequence[int]] = None, meta: Optional[Dict] = None, dtype: str = "float32"):
        """Open the store at ``path``, creating it when ``ids`` and ``size`` (H, W) are given.

        Reopening with ids or size that differ from the stored ones is an error, so results of
        two different sample sets never mix.
        """
        self.path = Path(path)
        self.dtype = dtype
        exists = (self.path / "zarr.json").exists() or (self.path / ".zgroup").exists()  # zarr v3 / v2
        if not exists and (ids is None or size is None):
            raise FileNotFoundError(
                f"no map store at {self.path}; run explain.py first, or pass ids and size to create one"
            )
        self.group = zarr.open_group(str(self.path), mode="a")
        if exists:
            stored_ids = list(self.group.attrs["ids"])
            stored_size = (int(self.group.attrs["height"]), int(self.group.attrs["width"]))
            if ids is not None and list(map(str, ids)) != stored_ids:
                raise ValueError(
                    f"the map store at {self.path} holds a different set of {len(stored_ids)} samples; "
                    "delete it or choose another path"
                )
            if size is not None and tuple(int(s) for s in size) != stored_size:
                raise ValueError(f"the map store at {self.path} holds {stored_size} maps, not {tuple(size)}")
        else:
            ids = [str(i) for i in ids]
            if len(set(ids)) != len(ids):
                raise ValueError("sample ids must be unique")
            height, width = (int(s) for s in size)
            self.group.attrs.update({"ids": ids, "height": height, "width": width, "meta": dict(meta or {})})
        self.ids: List[str] = list(self.group.attrs["ids"])
        self.size = (int(self.group.attrs["height"]), int(self.group.attrs["width"]))
        self._rows = {sample_id: row for row, sample_id in enumerate(self.ids)}

    @property
    def meta(self) -> Dict:
        return dict(self.group.attrs.get("meta", {}))

    @property
    def methods(self) -> List[str]:
        return sorted(self.group.group_keys())

    def rows(self, ids: Iterable[str]) -> np.ndarray:
        """Row numbers of ``ids``; an unknown id is an error."""
        try:
            return np.array([self._rows[str(i)] for i in ids], dtype=np.int64)
        except KeyError as error:
            raise KeyError(f"sample id {error.args[0]!r} is not in the map store at {self.path}") from None

    def _arrays(self, method: str, create: bool = False):
        if method not in self.group:
            if not create:
                raise KeyError(f"no maps for method {method!r} in {self.path}; stored methods: {self.methods}")
            sub = self.group.require_group(method)
            count, (height, width) = len(self.ids), self.size
            require = getattr(sub, "require_array", None) or sub.require_dataset  # zarr v3 / v2
            require("maps", shape=(count, height, width), chunks=(1, height, width), dtype=self.dtype, fill_value=0)
            require("done", shape=(count,), chunks=(1,), dtype="bool", fill_value=False)
        sub = self.group[method]
        return sub["maps"], sub["done"]

    def write(self, method: str, ids: Sequence[str], maps: Union[torch.Tensor, np.ndarray]) -> None:
        """Store maps (B, 1, H, W) or (B, H, W) of samples ``ids`` and mark them done."""
        if isinstance(maps, torch.Tensor):
            maps = maps.detach().float().cpu().numpy()
        maps = np.asarray(maps)
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.shape != (len(ids), *self.size):
            raise ValueError(f"maps must have shape ({len(ids)}, 1, {self.size[0]}, {self.size[1]}), got {maps.shape}")
        stored, done = self._arrays(method, create=True)
        for row, sample_map in zip(self.rows(ids), maps):
            stored[int(row)] = sample_map
            done[int(row)] = True

    def completed(self, method: str) -> np.ndarray:
        """Boolean (N,): which samples already have a map for ``method``."""
        if method not in self.group:
            return np.zeros(len(self.ids), dtype=bool)
        return np.asarray(self._arrays(method)[1][:], dtype=bool)

    def missing(self, method: str) -> List[str]:
        """Ids still without a map for ``method``, in store order."""
        done = self.completed(method)
        return [sample_id for sample_id, finished in zip(self.ids, done) if not finished]

    def read(self, method: str, ids: Optional[Sequence[str]] = None) -> np.ndarray:
        """Maps (n, H, W) of ``ids`` (default: all); reading a map that was never written is an error."""
        stored, done = self._arrays(method)
        rows = np.arange(len(self.ids)) if ids is None else self.rows(ids)
        finished = np.asarray(done[:], dtype=bool)[rows]
        if not finished.all():
            absent = [self.ids[r] for r in rows[~finished][:5]]
            raise ValueError(
                f"{int((~finished).sum())} requested maps of {method!r} were never written (e.g. {absent}); "
                "rerun explain.py, which resumes where it stopped"
            )
        if ids is None:
            return np.asarray(stored[:])
        return np.stack([np.asarray(stored[int(r)]) for r in rows]) if len(rows) else np.zeros((0, *self.size))
