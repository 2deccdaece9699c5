"""Score rows of stored maps: every score is one row of a long table (method, metric, level, value,
sample_id), ``level`` being the removal percentage / fraction of a curve, NaN for scalar metrics.

The functions take plain values (metric names, percentages, batch size, seed); :class:`Scoring`
holds the evaluate stage's settings (configs/evaluate.yaml) and hands them to them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .faithfulness import curve_auc, deletion_curve, rise_fractions, verification_curve
from .localization import LOCALIZATION_METRICS, boxes_to_masks
from .road import road_curve

ROAD_ORDERS = {"morf": True, "lerf": False}
ROAD_IMPUTATIONS = ("zero", "linear")
#: Metric-name suffix of each deletion / insertion protocol: "deletion" (ours), "deletion_rise" (RISE's).
DELETION_SUFFIXES = {"fame": "", "rise": "_rise"}


def score_rows(
    method: str, metric: str, levels: Sequence[Any], values: Tensor, ids: Sequence[str]
) -> List[Dict[str, Any]]:
    """Long-table rows of per-sample values (B,) or curves (B, L) at ``levels``."""
    values = values.detach().double().cpu()
    if values.dim() == 1:
        values = values.unsqueeze(1)
        levels = [np.nan]
    return [
        {"method": method, "metric": metric, "level": float(level), "value": float(values[b, k]), "sample_id": sid}
        for b, sid in enumerate(ids)
        for k, level in enumerate(levels)
    ]


def sample_seeds(seed: int, ids: Sequence[str]) -> Tensor:
    """One noise seed per sample from the run's seed and the sample id (CRC-32): a sample's ROAD noise
    is the same whatever batch, batch size, device or store it is scored in."""
    return torch.tensor([zlib.crc32(f"{seed}/{sample_id}".encode()) for sample_id in ids], dtype=torch.long)


def localization_rows(
    entry: str,
    maps: Tensor,
    batch: Dict[str, Any],
    ids: Sequence[str],
    side: Optional[str],
    mask_keys: Sequence[str],
    metrics: Sequence[str],
) -> List[Dict[str, Any]]:
    """``metrics`` of :data:`LOCALIZATION_METRICS` against each evidence mask of ``mask_keys`` the
    batch holds (``<side>_<key>`` for one side of a pair); the first mask's metrics keep their plain
    names, the others get ``@<key>``."""
    rows: List[Dict[str, Any]] = []
    for position, key in enumerate(mask_keys):
        batch_key = f"{side}_{key}" if side and f"{side}_{key}" in batch else key
        if key == "box_mask" and "boxes" in batch:  # ImageNet boxes, already mapped through resize/crop
            masks = boxes_to_masks(batch["boxes"], tuple(maps.shape[-2:])).to(maps.device)
        elif batch_key in batch:
            masks = batch[batch_key].to(maps.device)
        else:
            continue
        suffix = "" if position == 0 else f"@{key}"
        for name in metrics:
            rows += score_rows(entry, f"{name}{suffix}", [], LOCALIZATION_METRICS[name](maps, masks), ids)
    return rows


def classification_rows(
    model: nn.Module,
    entry: str,
    maps: Tensor,
    images: Tensor,
    targets: Tensor,
    ids: Sequence[str],
    *,
    families: Sequence[str],
    road_percentages: Sequence[float],
    road_orders: Sequence[str],
    road_imputations: Sequence[str],
    deletion_protocol: str,
    deletion_fractions: Sequence[float],
    batch_size: int,
    seed: int,
) -> List[Dict[str, Any]]:
    """ROAD (``families`` holds "road") and deletion / insertion ("deletion") rows of a classifier's maps."""
    rows: List[Dict[str, Any]] = []
    if "road" in families:
        percentages = list(road_percentages)
        for order in road_orders:
            for imputation in road_imputations:
                curves = road_curve(
                    model,
                    images,
                    maps,
                    targets,
                    percentages,
                    ROAD_ORDERS[order],
                    imputation,
                    batch_size=batch_size,
                    noise_seeds=sample_seeds(seed, ids),
                )
                name = f"road_{order}_{imputation}"
                rows += score_rows(entry, f"{name}_logit_drop", percentages, curves.logit_drop, ids)
                rows += score_rows(entry, f"{name}_probability", percentages, curves.probability, ids)
                rows += score_rows(entry, f"{name}_accuracy", percentages, curves.correct, ids)
    if "deletion" in families:
        fractions = (
            list(deletion_fractions) if deletion_protocol == "fame" else list(rise_fractions(*images.shape[-2:]))
        )
        mean = getattr(model, "mean", None)  # the colour the model's input normalization maps to 0
        for mode in ("deletion", "insertion"):
            curve = deletion_curve(
                model,
                images,
                maps,
                targets,
                fractions,
                mode,
                batch_size=batch_size,
                substrate=deletion_protocol,
                mean=mean if isinstance(mean, Tensor) else None,
            )
            name = mode + DELETION_SUFFIXES[deletion_protocol]
            rows += score_rows(entry, name, fractions, curve, ids)
            rows += score_rows(entry, f"{name}_auc", [], curve_auc(curve, fractions), ids)
    return rows


def verification_rows(
    model: nn.Module,
    entry: str,
    maps: Tensor,
    batch: Dict[str, Any],
    threshold: float,
    ids: Sequence[str],
    *,
    percentages: Sequence[float],
    batch_size: int,
) -> List[Dict[str, Any]]:
    """Tab. 2: only the probe is perturbed, its top P% e+ pixels removed (deletion) or kept (insertion);
    per pair: correct at the fixed EER threshold. The AUC of the accuracy curve is the mean of the
    per-pair AUCs (the trapezoid rule is linear), so per-pair rows bootstrap correctly."""
    percentages = list(percentages)
    same = torch.as_tensor(batch["same"], device=maps.device)
    rows: List[Dict[str, Any]] = []
    for mode in ("deletion", "insertion"):
        curve = verification_curve(
            model, batch["gallery"], batch["probe"], same, maps, threshold, percentages, mode, batch_size=batch_size
        )
        rows += score_rows(entry, f"verification_{mode}", percentages, curve.correct, ids)
        auc = 100 * curve_auc(curve.correct, [p / 100 for p in percentages])
        rows += score_rows(entry, f"verification_{mode}_auc", [], auc, ids)
    return rows


@dataclass(frozen=True)
class Scoring:
    """The score settings of an evaluate run as plain values (configs/evaluate.yaml)."""

    families: Sequence[str]
    localization_metrics: Sequence[str]
    mask_keys: Sequence[str]
    road_percentages: Sequence[float]
    road_orders: Sequence[str]
    road_imputations: Sequence[str]
    deletion_protocol: str
    deletion_fractions: Sequence[float]
    verification_percentages: Sequence[float]
    batch_size: int
    seed: int

    def localization_rows(
        self, entry: str, maps: Tensor, batch: Dict[str, Any], ids: Sequence[str], side: Optional[str]
    ) -> List[Dict[str, Any]]:
        if "localization" not in self.families:
            return []
        return localization_rows(entry, maps, batch, ids, side, self.mask_keys, self.localization_metrics)

    def classification_rows(
        self, model: nn.Module, entry: str, maps: Tensor, images: Tensor, targets: Tensor, ids: Sequence[str]
    ) -> List[Dict[str, Any]]:
        return classification_rows(
            model,
            entry,
            maps,
            images,
            targets,
            ids,
            families=self.families,
            road_percentages=self.road_percentages,
            road_orders=self.road_orders,
            road_imputations=self.road_imputations,
            deletion_protocol=self.deletion_protocol,
            deletion_fractions=self.deletion_fractions,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def verification_rows(
        self, model: nn.Module, entry: str, maps: Tensor, batch: Dict[str, Any], threshold: float, ids: Sequence[str]
    ) -> List[Dict[str, Any]]:
        return verification_rows(
            model,
            entry,
            maps,
            batch,
            threshold,
            ids,
            percentages=self.verification_percentages,
            batch_size=self.batch_size,
        )
