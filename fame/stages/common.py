"""Pieces every stage uses: devices, loggers, datasets of a data config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from ..config import instantiate, plain

TASKS = ("classification", "verification")


def device_of(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_datamodule(config: DictConfig):
    """The LightningDataModule of ``config.data.datamodule``."""
    return instantiate(config.data.datamodule, "data.datamodule")


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


def wandb_logger(config: DictConfig, job: str, save_dir: Optional[Path] = None):
    """An offline-by-default W&B logger writing under the output folder, or None when disabled."""
    if not config.logger.get("enabled", True):
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_MODE", config.logger.mode)
    save_dir = Path(save_dir or config.paths.output_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=config.logger.project, name=f"{config.logger.get('name') or job}",
                       save_dir=str(save_dir), offline=config.logger.mode == "offline", job_type=job,
                       config=plain(config))


def finish_wandb(logger: Any) -> None:
    """Close a W&B run so its offline files are complete."""
    if logger is not None and hasattr(logger, "experiment"):
        logger.experiment.finish()
