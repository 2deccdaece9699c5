"""Scoring stored maps with ``Trainer.predict``: each rank scores its rows, rank zero merges them.

A run is put together as::

    writer = ScoreWriter(parts_folder)
    trainer = Trainer(callbacks=[writer, ExplainProgressBar()], logger=False, ...)
    trainer.predict(ScoreModule(model, score_batch), loader, return_predictions=False)
    rows = writer.merge(trainer.world_size, expected_indices)    # where trainer.is_global_zero

``score_batch(batch)`` returns long-table rows (dicts with method, metric, level, value, sample_id)
of the samples of one batch; the loader's items carry ``index``, their row in the dataset
(:class:`fame.lightning.Indexed`). Every rank appends its rows to a JSON-lines file of its own as
batches finish; :meth:`ScoreWriter.merge` puts them in dataset order, keeping one copy of a row
index repeated by a padding sampler, so one process and many write the same rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Union

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn

Batch = Dict[str, Any]
Row = Dict[str, Any]


class ScoreModule(L.LightningModule):
    """Runs ``score_batch`` in ``predict_step``; a :class:`ScoreWriter` collects the rows.

    ``model`` is the network ``score_batch`` uses: held here so that Lightning moves it to the
    device and applies the trainer's precision (autocast for the mixed settings). The step runs
    under the predict loop's inference mode.
    """

    def __init__(self, model: nn.Module, score_batch: Callable[[Batch], List[Row]]):
        super().__init__()
        self.model = model
        self.score_batch = score_batch

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> List[Row]:
        if "index" not in batch or "id" not in batch:
            raise KeyError(
                "scoring batches need 'index' (wrap the dataset in fame.lightning.Indexed) and 'id' "
                f"(the dataset's sample ids); this batch has {sorted(batch)}"
            )
        return self.score_batch(batch)


class ScoreWriter(BasePredictionWriter):
    """Appends each rank's rows to ``<folder>/rank<R>.jsonl``, one line per sample of a batch:
    ``{"index": row in the dataset, "rows": [its rows]}`` (samples without rows included, so the
    merge can check that every sample was scored). Floats are written as JSON numbers (``NaN`` for
    the empty level of scalar metrics), which read back to the same values.
    """

    def __init__(self, folder: Union[str, Path]):
        super().__init__(write_interval="batch")
        self.folder = Path(folder)
        self._file: Optional[TextIO] = None

    def part(self, rank: int) -> Path:
        """The file of rank ``rank``."""
        return self.folder / f"rank{rank}.jsonl"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.predict_loop.return_predictions:
            raise ValueError(
                "call trainer.predict(..., return_predictions=False) with a ScoreWriter: the rows are "
                "written to its folder, and returning them would hold them twice"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = open(self.part(trainer.global_rank), "w")

    def write_on_batch_end(
        self, trainer, pl_module, prediction: List[Row], batch_indices, batch: Batch, batch_idx, dataloader_idx
    ) -> None:
        index_of = {str(sample_id): int(index) for sample_id, index in zip(batch["id"], batch["index"].tolist())}
        rows_of: Dict[int, List[Row]] = {index: [] for index in index_of.values()}
        for row in prediction:
            if row["sample_id"] not in index_of:
                raise ValueError(
                    f"score_batch returned a row of sample {row['sample_id']!r}, which is not in the "
                    f"batch (ids {list(index_of)})"
                )
            rows_of[index_of[row["sample_id"]]].append(row)
        for index, rows in rows_of.items():
            self._file.write(json.dumps({"index": index, "rows": rows}) + "\n")
        self._file.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file.close()
        trainer.strategy.barrier()  # every rank's file is complete before rank zero merges them

    def merge(self, world_size: int, indices: Sequence[int]) -> List[Row]:
        """The rows of every rank's file in dataset order (by ``index``; a sample's own rows in the
        order ``score_batch`` returned them), one copy per index; removes the folder.

        Raises RuntimeError when a rank's file is missing or a sample of ``indices`` was not scored.
        """
        rows_of: Dict[int, List[Row]] = {}
        for rank in range(world_size):
            path = self.part(rank)
            if not path.is_file():
                raise RuntimeError(f"rank {rank} of {world_size} wrote no scores ({path} is missing)")
            for line in path.read_text().splitlines():
                record = json.loads(line)
                rows_of.setdefault(int(record["index"]), record["rows"])  # a padding sampler's repeat: first kept
        missing = sorted(set(int(index) for index in indices) - set(rows_of))
        if missing:
            raise RuntimeError(f"{len(missing)} samples were not scored by any rank, e.g. dataset rows {missing[:5]}")
        shutil.rmtree(self.folder)
        return [row for index in sorted(rows_of) for row in rows_of[index]]
