"""LightningDataModule for classification datasets whose items are dicts (image, label, id, ...),
and the resumable training loader the data modules share.

A training run's data order and augmentation are functions of (seed, epoch, sample id), never of
a random state that a resumed run would not have: :class:`EpochShuffle` draws each epoch's order
from ``seed + epoch`` (as torch's DistributedSampler does, and shards it over the ranks the same
way), :func:`mirror_at_random` decides each sample's flip from a hash of (seed, epoch, sample id),
and :class:`ResumableLoader` hands Lightning its position (epoch, batches handed out), so a run
resumed from a checkpoint taken mid-epoch continues after the batches it had consumed.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any, Dict, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate


def collate_items(items):
    """Collate dict items; entries whose tensors differ in shape between items (e.g. a variable
    number of bounding boxes) stay lists."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        ragged = isinstance(values[0], torch.Tensor) and any(v.shape != values[0].shape for v in values)
        batch[key] = values if ragged else default_collate(values)
    return batch


def limited(dataset: Optional[Dataset], limit: Optional[int]) -> Optional[Dataset]:
    """The first ``limit`` samples of ``dataset`` (all of them when limit is None)."""
    if dataset is None or limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"limit must be a positive number of samples or None, got {limit}")
    return Subset(dataset, range(int(limit)))


class EpochShuffle(DistributedSampler):
    """This rank's share of a permutation drawn from ``seed + epoch`` (torch's DistributedSampler
    with ``shuffle=True``; one rank by default). Lightning calls :meth:`set_epoch` before each
    epoch and keeps a DistributedSampler it is given, so the order is the same in a resumed run
    and under DDP. ``skip`` positions are left out of the next pass only (a mid-epoch resume)."""

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed))
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochShuffle` whose state Lightning saves in checkpoints
    (``{"epoch", "batches"}``: the batches handed out in the epoch) and restores when it resumes
    mid-epoch (:class:`~fame.lightning.resume.ExactResume` sees to it when Lightning would not): the
    resumed pass starts after those batches. A checkpoint taken at the end of an
    epoch needs no loader state (Lightning sets the next epoch). Iteration starts at the first
    ``next()``, after Lightning's ``set_epoch``, so worker processes prefetch the right epoch.

    Randomness drawn inside worker processes is not part of the state: keep augmentation keyed
    (as :func:`mirror_at_random`) for a resumed run to equal an uninterrupted one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochShuffle):
            raise TypeError(f"ResumableLoader needs an EpochShuffle sampler, got {type(self.sampler).__name__}")
        self.batches_out = 0
        self.resume_after = 0

    def __iter__(self) -> Iterator[Any]:
        self.batches_out, self.resume_after = self.resume_after, 0
        for batch in super().__iter__():
            self.batches_out += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self.batches_out)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # taken after the epoch's last batch: the next epoch starts afresh
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * int(self.batch_size)
        self.resume_after = batches


def split_dataset(datamodule, split: str) -> Dataset:
    """The dataset of one split (train, val, test) of a datamodule, after ``setup``."""
    datasets = getattr(datamodule, "datasets", None)
    if isinstance(datasets, dict):  # ClassificationDataModule
        if datasets.get(split) is None:
            known = [name for name, value in datasets.items() if value is not None]
            raise ValueError(f"the data config has no {split!r} split; it has {known}: set split= to one of them")
        return datasets[split]
    datamodule.setup("predict")
    pairs = getattr(datamodule, "pair_set", None)  # VerificationDataModule
    if pairs is not None:
        return pairs
    raise ValueError(f"{type(datamodule).__name__} has no dataset for split {split!r}")


def resumable_loader(
    dataset: Dataset, batch_size: int, seed: int, trainer: Optional[L.Trainer] = None, **loader_arguments: Any
) -> ResumableLoader:
    """A shuffled :class:`ResumableLoader` of ``dataset`` sharded over the ``trainer``'s ranks
    (one rank without a trainer); its own generator draws the worker seeds, so making it leaves
    the global random state alone."""
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    return ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(dataset, seed, replicas, rank),
        generator=torch.Generator().manual_seed(int(seed)),
        **loader_arguments,
    )


def flip_decision(sample_id: str, seed: int, epoch: int) -> bool:
    """Whether a sample is mirrored in an epoch: one bit of blake2b("<seed>:<epoch>:<id>"), the
    same in every process, rank, worker and resumed run."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{sample_id}".encode(), digest_size=1).digest()
    return bool(digest[0] & 1)


def mirror_at_random(batch: Dict[str, Any], seed: int, epoch: int) -> Dict[str, Any]:
    """The batch with each sample's image and every tensor of the image's height and width (its
    masks) mirrored left to right where :func:`flip_decision` of its ``id`` says so."""
    ids = batch.get("id")
    if not isinstance(ids, Sequence) or isinstance(ids, str):
        raise KeyError("random flips are keyed by sample id: the training items need an 'id' (or set flip=false)")
    image = batch["image"]
    flip = torch.tensor([flip_decision(str(sample_id), seed, epoch) for sample_id in ids], device=image.device)
    size = image.shape[-2:]
    flipped = dict(batch)
    for key, value in batch.items():
        if (
            isinstance(value, torch.Tensor)
            and value.dim() >= 3
            and value.shape[0] == flip.numel()
            and value.shape[-2:] == size
        ):
            flipped[key] = torch.where(flip.view(-1, *[1] * (value.dim() - 1)), value.flip(-1), value)
    return flipped


class ClassificationDataModule(L.LightningDataModule):
    """Train / val / test loaders over datasets yielding {"image", "label", "id", ...} dicts.

    Training batches come in an order drawn from ``seed`` and the epoch (:class:`EpochShuffle`)
    and get horizontal flips of the image and its masks keyed by (seed, epoch, sample id)
    (:func:`mirror_at_random`), so a resumed run sees the batches an uninterrupted one would.
    ``limit`` caps every split for quick runs; ``pin_memory`` defaults to CUDA availability.
    """

    def __init__(
        self,
        train: Optional[Dataset] = None,
        val: Optional[Dataset] = None,
        test: Optional[Dataset] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        limit: Optional[int] = None,
        flip: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.datasets = {name: limited(ds, limit) for name, ds in (("train", train), ("val", val), ("test", test))}
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.flip = flip
        self.seed = seed

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        if dataset is None:
            raise ValueError(f"this ClassificationDataModule has no {split} dataset")
        arguments = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_items,
            persistent_workers=self.num_workers > 0,
        )
        if shuffle:
            return resumable_loader(dataset, self.batch_size, self.seed, self.trainer, **arguments)
        # An own generator draws the worker seeds: the global random state (dropout's) stays the same
        # whatever num_workers, so the run does too.
        return DataLoader(dataset, batch_size=self.batch_size, generator=torch.Generator(), **arguments)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.flip and self.trainer is not None and self.trainer.training:
            return mirror_at_random(batch, self.seed, self.trainer.current_epoch)
        return batch
