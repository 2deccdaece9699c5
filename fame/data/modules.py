"""LightningDataModule for classification datasets whose items are dicts (image, label, id, ...)."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data import default_collate


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


class ClassificationDataModule(L.LightningDataModule):
    """Train / val / test loaders over datasets yielding {"image", "label", "id", ...} dicts.

    Training batches are shuffled (seeded) and get random horizontal flips of the image and its masks;
    ``limit`` caps every split for quick runs; ``pin_memory`` defaults to CUDA availability.
    """

    def __init__(self, train: Optional[Dataset] = None, val: Optional[Dataset] = None,
                 test: Optional[Dataset] = None, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: Optional[bool] = None, limit: Optional[int] = None, flip: bool = True,
                 seed: int = 0):
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
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, generator=generator, collate_fn=collate_items,
                          persistent_workers=self.num_workers > 0)

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
            flip = torch.rand(batch["image"].shape[0], device=batch["image"].device) < 0.5
            size = batch["image"].shape[-2:]
            for key, value in batch.items():  # the image and every mask of its size flip together
                if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-2:] == size:
                    batch[key] = torch.where(flip.view(-1, 1, 1, 1), value.flip(-1), value)
        return batch
