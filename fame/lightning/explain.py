"""Explaining a dataset with ``Trainer.predict``: each rank computes the maps of its rows and writes them.

A run is put together as::

    store = MapStore.create_or_open(path, num_samples=len(dataset), size=(H, W), meta=...)
    methods = [ExplainMethod(store.begin_method(name, settings, ...), compute) for ...]
    loader = DataLoader(MissingRows(dataset, store, [m.name for m in methods]), batch_size=...)
    trainer = Trainer(callbacks=[MapWriter(store.path), ExplainProgressBar()], logger=False, ...)
    trainer.predict(ExplainModule(model, methods, store.path), loader, return_predictions=False)

Every rank (under DDP each process runs the lines above) builds the loader before ``predict``, so
all ranks split the same rows; Lightning's predict sampler hands each row to exactly one rank.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..provenance import environment
from ..store import STAT_NAMES, MapStore

log = logging.getLogger(__name__)

Batch = Dict[str, Any]


class Indexed(Dataset):
    """A dataset of dict items, each with ``index``: its row in the dataset (and in the map store)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"explaining needs dataset items that are dicts with an 'id'; item {index} is a {type(item).__name__}"
            )
        return {**item, "index": index}


class MissingRows(Subset):
    """The rows of ``dataset`` still missing in at least one of ``methods`` of ``store``, with their ``index``.

    ``rows`` holds the dataset indices covered; it is empty when every map is already there.
    """

    def __init__(self, dataset: Dataset, store: MapStore, methods: Sequence[str]):
        if len(dataset) != store.num_samples:
            raise ValueError(
                f"the dataset has {len(dataset)} samples but the map store at {store.path} has "
                f"{store.num_samples} rows; explain the dataset the store was made for"
            )
        missing = np.zeros(store.num_samples, dtype=bool)
        for method in methods:
            missing[store.missing_rows(method)] = True
        self.rows = np.flatnonzero(missing)
        super().__init__(Indexed(dataset), self.rows.tolist())


@dataclass(frozen=True)
class ExplainMethod:
    """One method of a run: the name it writes to in the store (as ``MapStore.begin_method`` returned
    it) and ``compute(model, batch) -> MethodResult``, called with the batch's rows still missing."""

    name: str
    compute: Callable[[nn.Module, Batch], Any]


@dataclass
class EntryMaps:
    """Maps of one store entry for some rows of a batch, on the CPU."""

    rows: np.ndarray
    ids: List[str]
    maps: Tensor
    stats: Optional[Dict[str, np.ndarray]] = None


@dataclass
class ExplainedBatch:
    """What ``ExplainModule.predict_step`` returns: maps per store entry and compute time per method."""

    entries: Dict[str, EntryMaps] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    samples: Dict[str, int] = field(default_factory=dict)


def select_rows(batch: Any, positions: Tensor, size: int) -> Any:
    """The items at ``positions`` of a collated batch of ``size`` samples (tensors, lists, nested dicts)."""
    if isinstance(batch, Tensor) and batch.ndim > 0 and batch.shape[0] == size:
        return batch[positions.to(batch.device)]
    if isinstance(batch, Mapping):
        return {key: select_rows(value, positions, size) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and len(batch) == size:
        return type(batch)([batch[i] for i in positions.tolist()])
    return batch


def autograd_ready(batch: Any) -> Any:
    """A copy of the batch whose tensors can enter autograd (made outside inference mode)."""
    if isinstance(batch, Tensor):
        return batch.clone()
    if isinstance(batch, Mapping):
        return {key: autograd_ready(value) for key, value in batch.items()}
    if isinstance(batch, list):
        return [autograd_ready(value) for value in batch]
    if isinstance(batch, tuple):
        return tuple(autograd_ready(value) for value in batch)
    return batch


def _stats_columns(stats: Any) -> Optional[Dict[str, np.ndarray]]:
    """``FameStats`` (or a mapping with its fields) as float32 arrays; None when absent."""
    if stats is None:
        return None
    get = stats.get if isinstance(stats, Mapping) else lambda name: getattr(stats, name, None)
    columns = {}
    for name in STAT_NAMES:
        values = get(name)
        if values is not None:
            columns[name] = (
                values.detach().float().cpu().numpy()
                if isinstance(values, Tensor)
                else np.asarray(values, dtype=np.float32)
            )
    return columns


class ExplainModule(L.LightningModule):
    """Runs explanation methods on ``model`` in ``predict_step``; a :class:`MapWriter` stores the results.

    Each method is computed only for the rows of the batch it still lacks in the store at
    ``store_path`` (read when predicting starts). Methods run outside inference mode with
    gradients on and on a clone of the batch (README, "In Python"), so ``Trainer(inference_mode=True)``,
    the default, is fine.
    """

    def __init__(self, model: nn.Module, methods: Sequence[ExplainMethod], store_path: Union[str, Path]):
        super().__init__()
        names = [method.name for method in methods]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"give one or more methods with distinct names, got {names}")
        self.model = model
        self.methods = list(methods)
        self.store_path = str(store_path)
        self._pending: Dict[str, np.ndarray] = {}
        self._entries: Dict[str, List[str]] = {}

    def on_predict_start(self) -> None:
        store = MapStore(self.store_path)
        for method in self.methods:
            self._entries[method.name] = store.outputs(method.name)
            self._pending[method.name] = np.zeros(store.num_samples, dtype=bool)
            self._pending[method.name][store.missing_rows(method.name)] = True

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> ExplainedBatch:
        if "index" not in batch or "id" not in batch:
            raise KeyError(
                "explain batches need 'index' (wrap the dataset in fame.lightning.Indexed or MissingRows) "
                f"and 'id' (the dataset's sample ids); this batch has {sorted(batch)}"
            )
        rows = batch["index"].cpu().numpy().astype(np.int64)
        result = ExplainedBatch()
        for method in self.methods:
            wanted = self._pending[method.name][rows]
            if not wanted.any():
                continue
            positions = torch.from_numpy(np.flatnonzero(wanted))
            part = select_rows(batch, positions, len(rows))
            ids = [str(sample_id) for sample_id in part["id"]]
            start = time.perf_counter()
            with torch.inference_mode(False), torch.enable_grad():
                computed = method.compute(self.model, autograd_ready(part))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            result.seconds[method.name] = time.perf_counter() - start
            result.samples[method.name] = len(ids)
            self._collect(method.name, computed, rows[wanted], ids, result)
        return result

    def _collect(self, method: str, computed: Any, rows: np.ndarray, ids: List[str], result: ExplainedBatch) -> None:
        maps_by_output = getattr(computed, "maps", None)
        if not isinstance(maps_by_output, Mapping):
            raise TypeError(
                f"method {method!r} must return a MethodResult (maps per output), got {type(computed).__name__}"
            )
        expected = self._entries[method]
        produced = [method if output == "" else f"{method}/{output}" for output in maps_by_output]
        if sorted(produced) != sorted(expected):
            raise ValueError(
                f"method {method!r} made maps {produced}, but its store entries are {expected}; "
                "begin the method with the outputs it makes"
            )
        stats_by_output = getattr(computed, "stats", None) or {}
        for (output, maps), entry in zip(maps_by_output.items(), produced):
            if maps.ndim != 4 or maps.shape[0] != len(rows) or maps.shape[1] != 1:
                raise ValueError(
                    f"method {method!r} returned maps of shape {tuple(maps.shape)} for {len(rows)} "
                    "samples; expected (B, 1, H, W)"
                )
            result.entries[entry] = EntryMaps(
                rows, ids, maps.detach().float().cpu(), _stats_columns(stats_by_output.get(output))
            )


class EmptyMapWarning(UserWarning):
    """Some samples took no FAME step (their loss started below epsilon), so their maps are empty."""


class MapWriter(BasePredictionWriter):
    """Writes each rank's maps into the map store as batches finish: no collectives, no waiting.

    Each rank appends to segment and index files of its own (see :mod:`fame.store`), so ranks never
    share a file, and a rank killed mid-batch loses only the batches it had in flight.

    When predicting ends, rank zero warns about samples with empty maps (zero FAME steps, read
    from the store's statistics) and appends a JSON line to ``<store>.runs.jsonl`` with the
    environment, the world size and per-method timings summed over ranks.
    """

    def __init__(self, store_path: Union[str, Path]):
        super().__init__(write_interval="batch")
        self.store_path = Path(store_path)
        self.log_path = self.store_path.with_name(self.store_path.name + ".runs.jsonl")
        self._store: Optional[MapStore] = None
        self._seconds: Dict[str, float] = {}
        self._samples: Dict[str, int] = {}
        self._write_seconds = 0.0
        self._started = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.predict_loop.return_predictions:
            raise ValueError(
                "call trainer.predict(..., return_predictions=False) with a MapWriter: the maps are "
                "written to the store, and returning them would hold every map in memory"
            )
        if not isinstance(pl_module, ExplainModule):
            raise TypeError(f"MapWriter writes the results of an ExplainModule, not of {type(pl_module).__name__}")
        self._store = MapStore(self.store_path)
        self._seconds = {method.name: 0.0 for method in pl_module.methods}
        self._samples = {method.name: 0 for method in pl_module.methods}
        self._write_seconds = 0.0
        self._started = time.perf_counter()

    def write_on_batch_end(
        self, trainer, pl_module, prediction: ExplainedBatch, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        start = time.perf_counter()
        for entry, part in prediction.entries.items():
            self._store.write(entry, part.rows, part.ids, part.maps, part.stats)
        self._write_seconds += time.perf_counter() - start
        for method, seconds in prediction.seconds.items():
            self._seconds[method] += seconds
            self._samples[method] += prediction.samples[method]

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._store.close()  # this rank's segment and index files are complete
        methods = list(self._seconds)
        local = torch.tensor(
            [[self._seconds[m], self._samples[m]] for m in methods] + [[self._write_seconds, 0.0]],
            dtype=torch.float64,
            device=pl_module.device,
        )
        gathered = trainer.strategy.all_gather(local)
        totals = (gathered.reshape(-1, *local.shape).sum(dim=0)).cpu()
        wall = time.perf_counter() - self._started
        trainer.strategy.barrier()
        if trainer.global_rank != 0:
            return
        timings = {
            method: {
                "samples": int(totals[k, 1]),
                "seconds": round(float(totals[k, 0]), 4),
                "ms_per_sample": round(1000 * float(totals[k, 0]) / max(int(totals[k, 1]), 1), 3),
            }
            for k, method in enumerate(methods)
        }
        for method, timing in timings.items():
            log.info(
                "%s: %d maps in %.1f s of compute (%.1f ms per sample, all ranks)",
                method,
                timing["samples"],
                timing["seconds"],
                timing["ms_per_sample"],
            )
        store = self._store
        empty = self._warn_empty_maps(store, [entry for method in methods for entry in store.outputs(method)])
        record = {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "store": str(self.store_path),
            "world_size": trainer.world_size,
            "wall_seconds": round(wall, 3),
            "write_seconds": round(float(totals[-1, 0]), 4),
            "methods": timings,
            "empty_maps": empty,
            "environment": environment(),
        }
        with open(self.log_path, "a") as file:
            file.write(json.dumps(record) + "\n")

    @staticmethod
    def _warn_empty_maps(store: MapStore, entries: Sequence[str]) -> Dict[str, int]:
        """Count (and warn about) stored samples of ``entries`` that took zero FAME steps."""
        counts = {}
        for entry in entries:
            stats = store.read_stats(entry)
            empty = stats[stats["iterations"] == 0]
            if len(empty) == 0:
                continue
            counts[entry] = len(empty)
            warnings.warn(
                f"{entry}: {len(empty)} of {len(stats)} maps are empty because FAME took no step (the loss started "
                f"below epsilon), e.g. {', '.join(map(str, empty['id'][:5]))}. MapStore.read_stats({entry!r}) "
                "lists them; report or exclude them when evaluating.",
                EmptyMapWarning,
                stacklevel=2,
            )
        return counts


class ExplainProgressBar(TQDMProgressBar):
    """The predict bar counted in samples: items/s and time left for this rank's rows."""

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader.batch_sampler, "sampler", None)  # under DDP, this rank's share of the rows
        self.predict_progress_bar.reset(total=len(sampler if sampler is not None else loader.sampler))
        self.predict_progress_bar.set_description(self.predict_description)
        self._samples_done = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._samples_done += len(batch["index"])
        bar = self.predict_progress_bar
        if not bar.disable and (
            self.refresh_rate and (batch_idx + 1) % self.refresh_rate == 0 or self._samples_done == bar.total
        ):
            bar.n = self._samples_done
            bar.refresh()
