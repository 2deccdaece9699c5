"""Training a classifier with Lightning: the synthetic default, any torchvision model, fine-tuning."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..config import instantiate
from .checkpoints import load_module_checkpoint

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")


def build_classification_model(spec: Dict[str, Any]) -> nn.Module:
    """A classifier from a plain spec with a ``_target_`` (e.g. ``fame.models.SmallCNN``,
    ``fame.models.build_classifier``); the older ``{"name": "small_cnn", ...}`` form is accepted."""
    spec = dict(spec)
    if "_target_" in spec:
        return instantiate(spec, "model")
    name = spec.pop("name", None)
    if name == "small_cnn":
        from ..models.cnn import SmallCNN

        return SmallCNN(**spec)
    from ..models import build_classifier

    return build_classifier(name, **spec)


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of any classifier; logs loss, top-1 and top-5 accuracy (torchmetrics).

    ``model`` is a plain-dict spec (kept out of OmegaConf so checkpoints load with
    ``weights_only=True``); the built network is ``self.model``. ``optimizer``: "adamw" or "sgd"
    (momentum, nesterov); ``schedule``: "onecycle" (warm-up fraction), "cosine" (per step, to 0),
    "step" (x gamma every ``step_epochs``) or "constant".
    """

    def __init__(self, model: Dict[str, Any], optimizer: str = "adamw", lr: float = 3e-3,
                 weight_decay: float = 1e-4, momentum: float = 0.9, nesterov: bool = False,
                 schedule: str = "onecycle", warmup_fraction: float = 0.3, step_epochs: int = 30,
                 gamma: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.save_hyperparameters()
        # build_classifier hands out networks in eval mode; Lightning keeps submodule modes as found.
        self.model = build_classification_model(model).train()
        classes = self._num_classes()
        # ModuleDict keys may not shadow nn.Module attributes ("train"): the stage name is a suffix.
        self.top1 = nn.ModuleDict({f"{s}_": MulticlassAccuracy(classes, top_k=1) for s in ("train", "val", "test")})
        self.top5 = nn.ModuleDict({f"{s}_": MulticlassAccuracy(classes, top_k=min(5, classes)) for s in ("val", "test")})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = None,
                             strict: Optional[bool] = None, *, trust: bool = False, named_targets: Iterable[str] = (),
                             **hyperparameters: Any) -> "ImageClassifier":
        """An ImageClassifier from a Lightning checkpoint, which is data: read with
        ``torch.load(weights_only=True)``, its model spec built only when it names the project's
        builders or ``named_targets`` (see :func:`fame.lightning.checkpoints.load_module_checkpoint`);
        ``trust=True`` for a file you made yourself. ``hyperparameters`` replace the file's."""
        return load_module_checkpoint(cls, checkpoint_path, trust=trust, named_targets=named_targets,
                                      map_location=map_location, strict=strict, **hyperparameters)

    def _num_classes(self) -> int:
        last = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not last:
            raise ValueError("the classifier has no nn.Linear head to read the number of classes from")
        return last[-1].out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _step(self, batch: Dict[str, Any], stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        labels = torch.as_tensor(batch["label"], device=logits.device)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        size = labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", batch_size=size, sync_dist=stage != "train")
        self.top1[f"{stage}_"](logits, labels)
        self.log(f"{stage}/acc", self.top1[f"{stage}_"], prog_bar=True, batch_size=size, on_epoch=True, on_step=stage == "train")
        if f"{stage}_" in self.top5:
            self.top5[f"{stage}_"](logits, labels)
            self.log(f"{stage}/acc_top5", self.top5[f"{stage}_"], batch_size=size, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        parameters = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(parameters, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                        weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant":
            return optimizer
        if hp.schedule == "step":
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_epochs, gamma=hp.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}
        steps = int(self.trainer.estimated_stepping_batches)
        if hp.schedule == "cosine":
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        else:
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=steps,
                                                           pct_start=hp.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def load_classifier(checkpoint: str | os.PathLike, map_location: Optional[str] = "cpu", *,
                    trust: bool = False) -> ImageClassifier:
    """An ImageClassifier from a Lightning checkpoint, loaded with ``weights_only=True`` (see
    :meth:`ImageClassifier.load_from_checkpoint`)."""
    return ImageClassifier.load_from_checkpoint(checkpoint, map_location=map_location, trust=trust)
