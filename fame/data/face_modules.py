"""LightningDataModules for face recognition: identity training and pair verification.

Both are generic over map-style datasets. Training datasets yield either dicts with ``image``
and ``label`` (and optionally ``id`` and masks, as :class:`~fame.data.SyntheticFaces`) or tuples
``(uint8 (H, W, 3) RGB array, int label)`` (as :class:`~fame.data.RecordIODataset` and
:class:`~fame.data.IdentityFolderDataset`). Verification datasets yield dicts with ``gallery``,
``probe``, ``same`` and ``id`` (as :class:`~fame.data.PairsDataset` and
:class:`~fame.data.SyntheticFacePairs`). Batches are dicts of float (B, 3, H, W) images in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .modules import mirror_at_random, resumable_loader

PAIR_KEYS = ("gallery", "probe", "same", "id")


def as_image_tensor(image: Any, where: str) -> Tensor:
    """A float32 (3, H, W) tensor in [0, 1] from a uint8 (H, W, 3) RGB array or a (3, H, W) tensor.

    Float tensors are taken as already in [0, 1]; uint8 tensors and arrays are divided by 255.
    ``where`` names the sample in error messages.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{where}: expected an RGB array of shape (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise TypeError(f"{where}: expected a uint8 RGB array (0..255), got dtype {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{where}: expected an image tensor of shape (3, H, W), got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float().div_(255.0)
        if not image.is_floating_point():
            raise TypeError(f"{where}: expected a float image tensor in [0, 1] or uint8, got dtype {image.dtype}")
        return image.float()
    raise TypeError(
        f"{where}: expected the image as a uint8 (H, W, 3) numpy array or a (3, H, W) tensor, "
        f"got {type(image).__name__}"
    )


def _face_sample(item: Any, index: int) -> dict[str, Any]:
    """Normalize one training item (dict or ``(image, label)`` tuple) to a dict with a float image."""
    where = f"training sample {index}"
    if isinstance(item, dict):
        missing = [key for key in ("image", "label") if key not in item]
        if missing:
            raise KeyError(f"{where}: a dict item needs the keys 'image' and 'label', missing {missing}")
        sample = dict(item)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        sample = {"image": item[0], "label": item[1]}
    else:
        raise TypeError(
            f"{where}: expected a dict with 'image' and 'label' or an (image, label) tuple, got {type(item).__name__}"
        )
    sample["image"] = as_image_tensor(sample["image"], where)
    sample["label"] = int(sample["label"])
    sample["id"] = str(sample.get("id", index))
    return sample


class _FaceSamples(Dataset):
    """The chosen samples of a training dataset as dicts."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        return _face_sample(self.dataset[index], index)


class _PairSamples(Dataset):
    """The chosen pairs of a verification dataset with float images and a bool ``same``."""

    def __init__(self, pairs: Dataset, indices: Sequence[int]) -> None:
        self.pairs = pairs
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        item = self.pairs[index]
        where = f"pair {index}"
        if not isinstance(item, dict) or any(key not in item for key in PAIR_KEYS):
            found = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise KeyError(f"{where}: expected a dict with the keys {list(PAIR_KEYS)}, got {found}")
        sample = dict(item)
        sample["gallery"] = as_image_tensor(item["gallery"], f"{where}, gallery")
        sample["probe"] = as_image_tensor(item["probe"], f"{where}, probe")
        sample["same"] = bool(item["same"])
        sample["id"] = str(item["id"])
        return sample


def spread_indices(length: int, limit: Optional[int]) -> list[int]:
    """``limit`` indices spread evenly over ``range(length)`` (all of them when limit is None).

    Protocol files list genuine and impostor pairs in blocks, so taking the first pairs could
    keep only one kind; evenly spread ones keep both.
    """
    if limit is None or limit >= length:
        return list(range(length))
    return np.linspace(0, length - 1, limit).round().astype(int).tolist()


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive number of samples or None, got {limit!r}")


def _check_loader_args(batch_size: int, num_workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")


class FaceTrainingDataModule(L.LightningDataModule):
    """Train / val loaders over a face identity dataset, split at random by ``seed``.

    ``limit`` keeps the first ``limit`` samples (identity-sorted sets keep whole identities, so a
    quick run still sees several images per class) before ``val_fraction`` of them are held out
    (at least one when the fraction is positive). Training batches come in an order drawn from
    ``seed`` and the epoch, drop the last incomplete batch and, when ``flip`` is set, are mirrored
    per sample on the device as keyed by (seed, epoch, sample id) (see
    :func:`~fame.data.modules.mirror_at_random`), so a resumed run sees the batches an
    uninterrupted one would. ``num_classes`` is, in order:
    the argument, the dataset's ``num_classes``, or one more than the largest label among the
    samples used (found by reading them all). ``pin_memory`` defaults to CUDA being available.
    """

    def __init__(
        self,
        dataset: Dataset,
        val_fraction: float = 0.05,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        limit: Optional[int] = None,
        flip: bool = True,
        seed: int = 0,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        _check_loader_args(batch_size, num_workers)
        _check_limit(limit)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.save_hyperparameters(ignore=["dataset"])
        self.dataset = dataset
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.limit = limit
        self.flip = flip
        self.seed = int(seed)
        self._num_classes = num_classes
        self.train_set: Optional[_FaceSamples] = None
        self.val_set: Optional[_FaceSamples] = None

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            declared = getattr(self.dataset, "num_classes", None)
            if declared is not None:
                self._num_classes = int(declared)
            else:
                self._num_classes = 1 + max(_face_sample(self.dataset[i], i)["label"] for i in self._used_indices())
        return self._num_classes

    def _used_indices(self) -> range:
        return range(min(len(self.dataset), self.limit or len(self.dataset)))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        used = self._used_indices()
        order = torch.randperm(len(used), generator=torch.Generator().manual_seed(self.seed)).tolist()
        num_val = math.ceil(self.val_fraction * len(used))
        val, train = sorted(order[:num_val]), sorted(order[num_val:])
        if len(train) < self.batch_size:
            raise ValueError(
                f"the training split has {len(train)} samples, fewer than one batch of {self.batch_size} "
                "(incomplete batches are dropped); lower batch_size or val_fraction, or raise limit"
            )
        self.train_set = _FaceSamples(self.dataset, [used[i] for i in train])
        self.val_set = _FaceSamples(self.dataset, [used[i] for i in val])

    def _loader(self, samples: Optional[_FaceSamples], training: bool) -> DataLoader:
        if samples is None:
            raise RuntimeError("call setup() (the Trainer does) before asking for a dataloader")
        arguments = dict(
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0
        )
        if training:
            return resumable_loader(samples, self.batch_size, self.seed, self.trainer, drop_last=True, **arguments)
        return DataLoader(
            samples, batch_size=self.batch_size, generator=torch.Generator(), **arguments
        )  # see modules.py

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, training=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.flip and self.trainer is not None and self.trainer.training:
            return mirror_at_random(batch, self.seed, self.trainer.current_epoch)
        return batch

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is not None and len(self.val_set) == 0:
            return []  # val_fraction=0: Lightning skips validation
        return self._loader(self.val_set, training=False)


class VerificationDataModule(L.LightningDataModule):
    """Val / test / predict loaders over verification pairs, in dataset order, never shuffled.

    ``limit`` keeps that many pairs spread evenly over the set (see :func:`spread_indices`).
    Each batch carries the pairs' ``id`` strings, so results can be matched back to the pairs.
    """

    def __init__(
        self,
        pairs: Dataset,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        limit: Optional[int] = None,
    ) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers)
        _check_limit(limit)
        self.save_hyperparameters(ignore=["pairs"])
        self.pairs = pairs
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.limit = limit
        self.pair_set: Optional[_PairSamples] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.pair_set is None:
            self.pair_set = _PairSamples(self.pairs, spread_indices(len(self.pairs), self.limit))

    def _loader(self) -> DataLoader:
        if self.pair_set is None:
            raise RuntimeError("call setup() (the Trainer does) before asking for a dataloader")
        return DataLoader(
            self.pair_set,
            batch_size=self.batch_size,
            shuffle=False,
            generator=torch.Generator(),  # worker seeds not drawn from the global random state
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class FaceRecognitionDataModule(L.LightningDataModule):
    """Identity training batches from a :class:`FaceTrainingDataModule` and one val
    (and test) dataloader per named :class:`VerificationDataModule`, in the order of
    ``verification`` (its keys are :attr:`val_sets`)."""

    def __init__(self, training: FaceTrainingDataModule, verification: Mapping[str, VerificationDataModule]) -> None:
        super().__init__()
        if not verification:
            raise ValueError("give at least one verification set: verification={name: VerificationDataModule}")
        self.training = training
        self.verification = dict(verification)

    @property
    def val_sets(self) -> list[str]:
        return list(self.verification)

    @property
    def num_classes(self) -> int:
        return self.training.num_classes

    def setup(self, stage: Optional[str] = None) -> None:
        self.training.trainer = self.trainer  # its loader shards over the ranks, its flips need the epoch
        if stage in (None, "fit"):
            self.training.setup(stage)
        for pairs in self.verification.values():
            pairs.setup(stage)

    def train_dataloader(self):
        return self.training.train_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.training.on_after_batch_transfer(batch, dataloader_idx)

    def val_dataloader(self):
        return [pairs.val_dataloader() for pairs in self.verification.values()]

    def test_dataloader(self):
        return [pairs.test_dataloader() for pairs in self.verification.values()]
