"""Training a classifier with Lightning (the synthetic default and any torchvision model)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..models.cnn import SmallCNN


def build_classification_model(spec: Dict[str, Any]) -> nn.Module:
    """A classifier from a plain spec: {"name": "small_cnn", "num_classes": 4, ...}."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "small_cnn":
        return SmallCNN(**spec)
    from ..models import build_classifier  # torchvision zoo

    return build_classifier(name, **spec)


class ImageClassifier(L.LightningModule):
    """Cross-entropy training with AdamW and a one-cycle schedule; logs loss and accuracy.

    ``model`` is a plain-dict spec (kept out of OmegaConf so checkpoints load with
    ``weights_only=True``); the built network is ``self.model``.
    """

    def __init__(self, model: Dict[str, Any], lr: float = 3e-3, weight_decay: float = 1e-4,
                 label_smoothing: float = 0.0, warmup_fraction: float = 0.3):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_classification_model(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _step(self, batch: Dict[str, Any], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        labels = torch.as_tensor(batch["label"], device=logits.device)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", batch_size=labels.shape[0], sync_dist=stage != "train")
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=labels.shape[0], sync_dist=stage != "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=self.hparams.warmup_fraction,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def load_classifier(checkpoint: str, map_location: Optional[str] = "cpu") -> ImageClassifier:
    """An ImageClassifier from a Lightning checkpoint, loaded with ``weights_only=True``."""
    return ImageClassifier.load_from_checkpoint(checkpoint, map_location=map_location, weights_only=True)
