"""Training a face-recognition model with Lightning: a face backbone, a margin head and verification.

The recipe follows insightface's arcface_torch: SGD (lr 0.1, momentum 0.9, weight decay 5e-4 on
every parameter), a polynomial decay stepped per batch after an optional linear warm-up (power 2 by
default, as arcface_torch's 2022 recipe; its current ``train_v2.py`` decays linearly, power 1),
the backbone's gradient norm clipped to 5, mixed precision on GPU through the Trainer's
``precision`` ("16-mixed" or "bf16-mixed"; the margin heads compute in float32 anyway).

Validation runs the standard face-recognition protocol on every configured verification set:
the embedding of each image plus its horizontal flip, L2-normalized; cosine similarity per pair;
insightface's k-fold accuracy (or the exact-threshold one) and k-fold VAL@FAR, the EER and the
whole-set TAR@FAR from :mod:`fame.metrics.verification`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Optional

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..data.face_modules import PAIR_KEYS
from ..files import plain
from ..metrics.verification import THRESHOLD_PROTOCOLS, verification_report
from ..models.export import export_onnx, export_state_dict
from ..models.face import FaceEmbedder, build_face_model
from ..models.heads import AdaFaceHead, ArcFaceHead, CombinedMarginHead, CosFaceHead
from .checkpoints import load_module_checkpoint
from .schedules import legacy_optimization, optimization, plain_specs

#: Margin heads by the ``name`` of a head spec.
HEADS = {"arcface": ArcFaceHead, "cosface": CosFaceHead, "combined": CombinedMarginHead, "adaface": AdaFaceHead}
#: arcface_torch's SGD: lr 0.1, momentum 0.9, weight decay 5e-4 on every parameter (``configs/module/face.yaml``).
SGD = MappingProxyType(
    {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
)
#: arcface_torch's 2022 polynomial decay, power 2, per step (:func:`fame.lightning.schedules.polynomial`).
POLYNOMIAL = MappingProxyType(
    {"_target_": "fame.lightning.schedules.polynomial", "_partial_": True, "power": 2.0, "warmup_steps": 0}
)
#: The metrics logged per verification set, as ``<stage>/<set>/<name>``.
SET_METRICS = (
    "acc",
    "acc_std",
    "eer",
    "eer_threshold",
    "tar_at_far",
    "kfold_val_at_far",
    "kfold_val_std",
    "kfold_far",
    "pairs",
)


def _plain(spec: Any, key: str) -> Optional[Dict[str, Any]]:
    """A spec as a plain dict (OmegaConf nodes converted), so checkpoints load with weights_only=True."""
    if spec is None:
        return None
    spec = plain(spec)
    if not isinstance(spec, dict):
        raise TypeError(f"{key} must be a mapping of keyword arguments, got {type(spec).__name__}: {spec!r}")
    return spec


def build_face_backbone(spec: Mapping[str, Any], embedding_size: int) -> FaceEmbedder:
    """A :class:`~fame.models.FaceEmbedder` from a plain spec.

    Either the keyword arguments of :func:`~fame.models.build_face_model` (``arch`` plus e.g.
    ``checkpoint`` to start from pretrained weights, ``input_size``, ``widths``, ``dropout``;
    ``embedding_size`` is added) or a ``_target_`` spec whose result is a FaceEmbedder.
    """
    spec = dict(spec)
    if "_target_" in spec:
        embedder = instantiate(spec, _convert_="all")
    else:
        if "arch" not in spec:
            raise ValueError(f"the backbone spec needs an 'arch' (see fame.models.face_arch_names()), got {spec!r}")
        if spec["arch"] != "onnx":
            spec.setdefault("embedding_size", embedding_size)
        embedder = build_face_model(**spec)
    if not isinstance(embedder, FaceEmbedder):
        raise TypeError(f"the backbone spec must build a fame.models.FaceEmbedder, got {type(embedder).__name__}")
    if embedder.embedding_size != embedding_size:
        raise ValueError(
            f"the backbone's embeddings have {embedder.embedding_size} dimensions but embedding_size is "
            f"{embedding_size}; set embedding_size={embedder.embedding_size}"
        )
    return embedder


def build_margin_head(spec: Optional[Mapping[str, Any]], embedding_size: int, num_classes: int) -> nn.Module:
    """A margin head from a plain spec: ``{"name": "arcface" | "cosface" | "combined" | "adaface",
    **its keyword arguments}`` (e.g. ``scale``, ``margin``; ``m1, m2, m3`` for combined) or a
    ``_target_`` spec; None is ArcFace with s = 64, m = 0.5."""
    spec = dict(spec or {"name": "arcface"})
    if "_target_" in spec:
        return instantiate(spec, embedding_size=embedding_size, num_classes=num_classes, _convert_="all")
    name = spec.pop("name", None)
    if name not in HEADS:
        raise ValueError(f"head name must be one of {sorted(HEADS)}, got {name!r}")
    return HEADS[name](embedding_size, num_classes, **spec)


def pair_key(pair_id: str) -> int:
    """A signed 64-bit integer standing for a pair id string, so ids can travel in tensor collectives."""
    return int.from_bytes(hashlib.blake2b(str(pair_id).encode(), digest_size=8).digest(), "little", signed=True)


class VerificationPairs(Metric):
    """The verification pairs of one set scored by every process: (scores, labels), each pair once,
    in the loader's pair order.

    ``update`` takes each batch's pair keys (:func:`pair_key`), cosine scores and labels. The states
    are lists concatenated across processes (``dist_reduce_fx="cat"``; torchmetrics gathers lists
    of uneven length). Lightning's DistributedSampler deals the pairs round-robin (rank r gets pairs
    r, r + W, ...) and pads the last round by repeating pairs, so ordering the gathered pairs by
    their position within their rank, ranks in order, restores the loader order (the folds are
    contiguous in it), and the repeats are dropped by pair key.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("keys", "positions", "scores", "labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, keys: Tensor, scores: Tensor, labels: Tensor) -> None:
        start = sum(part.numel() for part in self.keys)
        self.keys.append(keys)
        self.positions.append(torch.arange(start, start + keys.numel(), device=keys.device))
        self.scores.append(scores)
        self.labels.append(labels)

    def compute(self) -> tuple[Tensor, Tensor]:
        if isinstance(self.keys, list) and not self.keys:  # no pairs in any process
            return torch.zeros(0, device=self.device), torch.zeros(0, dtype=torch.bool, device=self.device)
        keys, positions, scores, labels = (
            dim_zero_cat(state) for state in (self.keys, self.positions, self.scores, self.labels)
        )
        order = torch.sort(positions.long(), stable=True).indices  # the cat keeps the ranks in order
        keys, scores, labels = keys.long()[order], scores[order], labels.long()[order]
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        positions = torch.arange(keys.numel(), device=keys.device)
        first = torch.full_like(unique_keys, keys.numel()).scatter_reduce_(0, inverse, positions, reduce="amin")
        first = torch.sort(first).values
        return scores[first], labels[first].bool()


class FaceRecognizer(L.LightningModule):
    """A face embedder trained through a margin head; verified on pair sets while it trains.

    Args:
        backbone: plain-dict spec of the embedder (see :func:`build_face_backbone`), e.g.
            ``{"arch": "iresnet50"}`` or ``{"arch": "small", "input_size": 64}``.
        head: plain-dict spec of the margin head (see :func:`build_margin_head`); None = ArcFace.
        num_classes: training identities.
        embedding_size: embedding dimensions (the backbone must produce this many).
        optimizer: ``_partial_`` spec of the optimizer (``configs/module/optimizer/``); arcface_torch's
            SGD by default.
        scheduler: ``_partial_`` spec of the learning-rate schedule (``configs/module/scheduler/``,
            :mod:`fame.lightning.schedules`); arcface_torch's polynomial decay (power 2) per step by
            default, None keeps the learning rate constant.
        clip_grad_norm: max L2 norm of the backbone's gradients (arcface_torch clips them to 5);
            None turns it off. The Trainer's ``gradient_clip_val``, if set, applies in addition to
            every parameter.
        val_sets: names of the verification sets, in the order of the val (and test) dataloaders;
            None takes ``val_sets`` of the Trainer's datamodule (:class:`~fame.data.FaceRecognitionDataModule`).
        folds: folds of the k-fold accuracy and VAL@FAR; ``far``: the false accept rate of
            ``tar_at_far`` and ``kfold_val_at_far``.
        thresholds: threshold candidates of the k-fold accuracy: "insightface" (the grid of
            insightface's verification code, which published accuracies use) or "exact" (one per
            distinct decision); see :func:`~fame.metrics.verification.ten_fold_accuracy`.

    ``self.embedder`` is the :class:`~fame.models.FaceEmbedder` ([0, 1] RGB in, embeddings out),
    ``self.head`` the margin head. Logs ``train/loss`` and, per verification set and stage
    (``val`` or ``test``), ``<stage>/<set>/acc`` (k-fold mean), ``acc_std``, ``eer``,
    ``eer_threshold``, ``tar_at_far`` (TAR at ``far`` on the whole set's ROC),
    ``kfold_val_at_far``, ``kfold_val_std`` and ``kfold_far`` (insightface's k-fold interpolated
    VAL at ``far``, its std and the FAR reached on the held-out folds) and ``pairs`` (distinct
    pairs scored), plus ``<stage>/acc_mean``, the mean accuracy over the sets, for checkpoint
    monitoring.
    """

    def __init__(
        self,
        backbone: Dict[str, Any],
        head: Optional[Dict[str, Any]],
        num_classes: int,
        embedding_size: int = 512,
        optimizer: Mapping[str, Any] = SGD,
        scheduler: Optional[Mapping[str, Any]] = POLYNOMIAL,
        clip_grad_norm: Optional[float] = 5.0,
        val_sets: Optional[List[str]] = None,
        folds: int = 10,
        far: float = 1e-3,
        thresholds: str = "insightface",
    ) -> None:
        super().__init__()
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        if thresholds not in THRESHOLD_PROTOCOLS:
            raise ValueError(f"thresholds must be one of {THRESHOLD_PROTOCOLS}, got {thresholds!r}")
        backbone = _plain(backbone, "backbone")
        head = _plain(head, "head")
        optimizer, scheduler = plain_specs(optimizer, scheduler)
        val_sets = None if val_sets is None else [str(name) for name in val_sets]
        self.save_hyperparameters()
        self.embedder = build_face_backbone(backbone, embedding_size).train()  # built in eval mode
        self.head = build_margin_head(head, embedding_size, num_classes)
        self._pairs: Dict[int, VerificationPairs] = {}

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
    ) -> FaceRecognizer:
        """A FaceRecognizer from a Lightning checkpoint, which is data: read with
        ``torch.load(weights_only=True)``, its backbone and head specs built only when they name
        the project's builders or ``named_targets`` (see
        :func:`fame.lightning.checkpoints.load_module_checkpoint`); ``trust=True`` for a file you
        made yourself. ``hyperparameters`` replace the file's."""
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
        """The backbone spec without the pretrained weights a run started from (``checkpoint``,
        ``trust``): the Lightning checkpoint holds the trained ones, and the file may be gone; the
        optimizer and scheduler specs of a checkpoint that names them by string (the layout before
        ``configs/module/optimizer/``)."""
        derived = legacy_optimization(hyperparameters, nesterov=False)
        backbone = hyperparameters.get("backbone")
        if isinstance(backbone, Mapping):
            derived["backbone"] = {key: value for key, value in backbone.items() if key not in ("checkpoint", "trust")}
        return derived

    @property
    def backbone_arguments(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`~fame.models.build_face_model` that rebuild this backbone's
        layout (``arch`` and the network arguments; no checkpoint)."""
        spec = {key: value for key, value in self.hparams.backbone.items() if key not in ("checkpoint", "trust")}
        if spec.get("arch") != "onnx" and "_target_" not in spec:
            spec.setdefault("embedding_size", self.hparams.embedding_size)
        return spec

    def forward(self, images: Tensor) -> Tensor:
        """Embeddings (B, D) of [0, 1] RGB crops (not normalized)."""
        return self.embedder(images)

    def embed_with_flip(self, images: Tensor) -> Tensor:
        """L2-normalized sum of the embeddings of the images and their horizontal mirrors."""
        both = self.embedder(torch.cat([images, images.flip(-1)]))
        original, mirrored = both.float().chunk(2)
        return F.normalize(original + mirrored, dim=1)

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Tensor:
        images, labels = batch["image"], torch.as_tensor(batch["label"], device=self.device)
        logits = self.head(self.embedder(images), labels)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The Trainer's clipping (if configured), then arcface_torch's ``clip_grad_norm_`` of the
        backbone. Under mixed precision Lightning unscales the gradients before this hook."""
        if gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if self.hparams.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.embedder.parameters(), self.hparams.clip_grad_norm)

    def configure_optimizers(self):
        return optimization(self, self.hparams.optimizer, self.hparams.scheduler)

    # ----------------------------------------------------------------------------- verification
    def _collect_pairs(self, batch: Dict[str, Any], dataloader_idx: int) -> None:
        if not isinstance(batch, Mapping) or any(key not in batch for key in PAIR_KEYS):
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"FaceRecognizer validates on verification pairs: batches need the keys {list(PAIR_KEYS)} "
                f"(a VerificationDataModule's loaders), got {found}"
            )
        gallery, probe = batch["gallery"], batch["probe"]
        embeddings = self.embed_with_flip(torch.cat([gallery, probe]))
        gallery_embeddings, probe_embeddings = embeddings.split(gallery.shape[0])
        scores = (gallery_embeddings * probe_embeddings).sum(dim=1)
        labels = torch.as_tensor(batch["same"], device=scores.device).long()
        keys = torch.tensor([pair_key(pair_id) for pair_id in batch["id"]], dtype=torch.long, device=scores.device)
        if dataloader_idx not in self._pairs:
            self._pairs[dataloader_idx] = VerificationPairs().to(self.device)
        self._pairs[dataloader_idx].update(keys, scores, labels)

    def _gather_pairs(self, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Every rank's (scores, labels) of one set, each pair once, in the loader's pair order
        (:class:`VerificationPairs`). A collective: every rank must call it."""
        pairs = self._pairs.get(dataloader_idx)
        if pairs is None:
            pairs = VerificationPairs().to(self.device)
        return pairs.compute()

    def _set_names(self, num_loaders: int) -> List[str]:
        names = self.hparams.val_sets
        if names is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            names = getattr(datamodule, "val_sets", None)
            if names is None:
                raise ValueError(
                    "name the verification sets: pass val_sets=[...] (one name per val dataloader, in order) "
                    "or use a FaceRecognitionDataModule"
                )
        if len(names) != num_loaders:
            raise ValueError(
                f"val_sets names {len(names)} verification sets ({list(names)}) but there are "
                f"{num_loaders} val dataloaders; give one name per dataloader, in order"
            )
        return list(names)

    def _log_verification(self, stage: str, num_loaders: int) -> None:
        names = self._set_names(num_loaders)
        accuracies = []
        for index, name in enumerate(names):
            scores, labels = self._gather_pairs(index)  # every rank, every set: a collective
            try:
                report = verification_report(
                    scores, labels, folds=self.hparams.folds, far=self.hparams.far, thresholds=self.hparams.thresholds
                )
            except ValueError as error:
                raise ValueError(f"verification set {name!r} ({labels.numel()} pairs): {error}") from error
            values = {
                "acc": report["accuracy_mean"],
                "acc_std": report["accuracy_std"],
                "eer": report["eer"],
                "eer_threshold": report["eer_threshold"],
                "tar_at_far": report["tar_at_far"],
                "kfold_val_at_far": report["kfold_val_at_far"],
                "kfold_val_std": report["kfold_val_std"],
                "kfold_far": report["kfold_far"],
                "pairs": float(labels.numel()),
            }
            for metric, value in values.items():
                self._log_everywhere(f"{stage}/{name}/{metric}", value)
            accuracies.append(report["accuracy_mean"])
        self._log_everywhere(f"{stage}/acc_mean", sum(accuracies) / len(accuracies), prog_bar=True)

    def _log_everywhere(self, name: str, value: float, prog_bar: bool = False) -> None:
        """Log a value every rank computed identically from the gathered pairs (reduced with max,
        which keeps it exact, so every rank's checkpoint callback sees the monitored value)."""
        self.log(name, value, prog_bar=prog_bar, add_dataloader_idx=False, sync_dist=True, reduce_fx="max")

    def on_validation_epoch_start(self) -> None:
        self._pairs = {}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect_pairs(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # a few sanity batches are too few pairs for k folds
            self._log_verification("val", len(self.trainer.num_val_batches))
        self._pairs = {}

    def on_test_epoch_start(self) -> None:
        self._pairs = {}

    def test_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect_pairs(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_verification("test", len(self.trainer.num_test_batches))
        self._pairs = {}

    # ----------------------------------------------------------------------------------- export
    def export_backbone(self, path: str | os.PathLike) -> Path:
        """Write the backbone: ONNX when ``path`` ends in ``.onnx`` (see
        :func:`~fame.models.export.export_onnx`), else a bare state_dict that
        ``build_face_model(checkpoint=path, **self.backbone_arguments)`` loads strictly."""
        if Path(path).suffix.lower() == ".onnx":
            return export_onnx(self.embedder, path)
        return export_state_dict(self.embedder, path)


def load_face_recognizer(
    checkpoint: str | os.PathLike, map_location: Optional[str] = "cpu", *, trust: bool = False
) -> FaceRecognizer:
    """A FaceRecognizer from a Lightning checkpoint, loaded with ``weights_only=True`` (see
    :meth:`FaceRecognizer.load_from_checkpoint`)."""
    return FaceRecognizer.load_from_checkpoint(checkpoint, map_location=map_location, trust=trust)
