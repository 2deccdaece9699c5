"""Training a classifier with Lightning: the synthetic default, any torchvision model, fine-tuning."""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any, Dict, Iterable, Mapping, Optional

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..files import plain
from ..models import name_target_layer
from .checkpoints import load_module_checkpoint
from .schedules import legacy_optimization, optimization, plain_specs

#: AdamW with the classifier's defaults (``configs/module/classifier.yaml``).
ADAMW = MappingProxyType({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3, "weight_decay": 1e-4})
#: One-cycle per step, 30% warm-up (:func:`fame.lightning.schedules.one_cycle`).
ONE_CYCLE = MappingProxyType(
    {"_target_": "fame.lightning.schedules.one_cycle", "_partial_": True, "warmup_fraction": 0.3}
)


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of any classifier; logs loss, top-1 and top-5 accuracy (torchmetrics).

    ``model`` is a plain-dict spec with a ``_target_`` (e.g. ``fame.models.SmallCNN``,
    ``fame.models.build_classifier``), kept out of OmegaConf so checkpoints load with
    ``weights_only=True``; the built network is ``self.model`` (a ``target_layer`` key names its
    layer for the explanation methods, :func:`fame.models.name_target_layer`). ``optimizer`` and ``scheduler``
    are ``_partial_`` specs (``configs/module/optimizer/``, ``configs/module/scheduler/``; see
    :func:`fame.lightning.schedules.optimization`); ``scheduler=None`` keeps the learning rate
    constant.
    """

    def __init__(
        self,
        model: Dict[str, Any],
        optimizer: Mapping[str, Any] = ADAMW,
        scheduler: Optional[Mapping[str, Any]] = ONE_CYCLE,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        model = plain(model)
        optimizer, scheduler = plain_specs(optimizer, scheduler)
        self.save_hyperparameters()
        # build_classifier hands out networks in eval mode; Lightning keeps submodule modes as found.
        # target_layer (configs/model/custom.yaml) names the model's layer for the methods; not the builder's
        spec = {key: value for key, value in model.items() if key != "target_layer"}
        self.model = instantiate(spec, _convert_="all").train()
        if model.get("target_layer") is not None:
            name_target_layer(self.model, str(model["target_layer"]))
        classes = self._num_classes()
        # ModuleDict keys may not shadow nn.Module attributes ("train"): the stage name is a suffix.
        self.top1 = nn.ModuleDict({f"{s}_": MulticlassAccuracy(classes, top_k=1) for s in ("train", "val", "test")})
        self.top5 = nn.ModuleDict(
            {f"{s}_": MulticlassAccuracy(classes, top_k=min(5, classes)) for s in ("val", "test")}
        )

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        strict: Optional[bool] = None,
        *,
        trust: bool = False,
        named_targets: Iterable[str] = (),
        **hyperparameters: Any,
    ) -> ImageClassifier:
        """An ImageClassifier from a Lightning checkpoint, which is data: read with
        ``torch.load(weights_only=True)``, its model spec built only when it names the project's
        builders or ``named_targets`` (see :func:`fame.lightning.checkpoints.load_module_checkpoint`);
        ``trust=True`` for a file you made yourself. ``hyperparameters`` replace the file's."""
        return load_module_checkpoint(
            cls,
            checkpoint_path,
            trust=trust,
            named_targets=named_targets,
            map_location=map_location,
            strict=strict,
            **hyperparameters,
        )

    @staticmethod
    def hyperparameters_from_checkpoint(hyperparameters: Mapping[str, Any]) -> Dict[str, Any]:
        """The optimizer and scheduler specs of a checkpoint that names them by string (the layout
        before ``configs/module/optimizer/``), so such checkpoints still load and resume."""
        return legacy_optimization(hyperparameters, nesterov=True)

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
        self.log(
            f"{stage}/acc",
            self.top1[f"{stage}_"],
            prog_bar=True,
            batch_size=size,
            on_epoch=True,
            on_step=stage == "train",
        )
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
        return optimization(self, self.hparams.optimizer, self.hparams.scheduler)
