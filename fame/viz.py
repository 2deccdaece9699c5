"""Overlays and image grids of attribution maps.

Figures are :class:`matplotlib.figure.Figure` objects (no pyplot, no backend chosen), so they
draw headless and leave an interactive session's backend alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from .report.figures import save_figure


def _to_numpy_image(image: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.clip(image, 0.0, 1.0)


def _to_numpy_map(attribution: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(attribution, torch.Tensor):
        attribution = attribution.detach().float().cpu().numpy()
    attribution = np.asarray(attribution, dtype=np.float32)
    while attribution.ndim > 2:
        attribution = attribution[0]
    return attribution


def overlay(image, attribution, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map over an image: (H, W, 3) float in [0, 1]."""
    picture = _to_numpy_image(image)
    heat = matplotlib.colormaps[cmap](np.clip(_to_numpy_map(attribution), 0.0, 1.0))[..., :3]
    return (1 - alpha) * picture + alpha * heat


def save_overlay_grid(
    images: Sequence,
    maps: Dict[str, Sequence],
    path: Union[str, Path],
    row_titles: Optional[Sequence[str]] = None,
    masks: Optional[Sequence] = None,
    alpha: float = 0.5,
    mark_maxima: bool = False,
    cell_inches: float = 1.9,
) -> Path:
    """One row per image: the image (with its evidence mask outlined, if given), then one overlay
    per method, titled with the method's name. Written as a PNG.

    ``mark_maxima`` outlines the mask on every overlay too and marks each map's maximum, the
    pointing game's point: a green cross inside the mask (a hit), a red one outside, white
    without a mask."""
    methods = list(maps)
    rows, cols = len(images), 1 + len(methods)
    figure = Figure(figsize=(cell_inches * cols, cell_inches * rows + (0.3 if mark_maxima else 0.0)))
    axes = figure.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        mask = _to_numpy_map(masks[r]) if masks is not None else None
        axes[r, 0].imshow(_to_numpy_image(images[r]))
        if mask is not None:
            axes[r, 0].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        if row_titles is not None:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=8)
        for c, method in enumerate(methods, start=1):
            attribution = _to_numpy_map(maps[method][r])
            axes[r, c].imshow(overlay(images[r], attribution, alpha))
            if not mark_maxima:
                continue
            if mask is not None:
                axes[r, c].contour(mask, levels=[0.5], colors="white", linewidths=0.5)
            row, col = np.unravel_index(int(np.argmax(attribution)), attribution.shape)  # first maximum
            colour = "white" if mask is None else ("lime" if mask[row, col] >= 0.5 else "red")
            axes[r, c].plot(col, row, marker="x", markersize=7, markeredgewidth=2, color=colour)
    for c, name in enumerate(["image", *methods]):
        axes[0, c].set_title(name, fontsize=9)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    if mark_maxima:
        figure.tight_layout(pad=0.3)
    return save_figure(figure, path)


def save_comparison_sheet(
    images: Sequence,
    maps: Dict[str, Sequence],
    path: Union[str, Path],
    row_titles: Optional[Sequence[str]] = None,
    masks: Optional[Sequence] = None,
    alpha: float = 0.5,
) -> Path:
    """The paper's comparison figure (README "Real photos"): :func:`save_overlay_grid` with FAME's
    maps (entries named ``fame...``) first, then each baseline's, each map's maximum marked."""
    order = sorted(maps, key=lambda name: (not name.startswith("fame"), list(maps).index(name)))
    return save_overlay_grid(
        images, {name: maps[name] for name in order}, path, row_titles, masks, alpha, mark_maxima=True, cell_inches=1.6
    )


def save_monitor_curves(metrics_csv: Union[str, Path], path: Union[str, Path]) -> Optional[Path]:
    """Curves of a training run's CSV log against the epoch: accuracies (train, validation, their
    gap), then the explanation monitor's pointing game and relevance mass per method and mask.

    Returns None when the log holds no monitor scalars.
    """
    import pandas as pd

    frame = pd.read_csv(metrics_csv)
    panels = {
        name: sorted(c for c in frame.columns if c.startswith("monitor/") and f"/{name}/" in c)
        for name in ("pointing_game", "relevance_mass")
    }
    if not any(panels.values()) or "epoch" not in frame.columns:
        return None
    per_epoch = frame.groupby("epoch").mean(numeric_only=True)
    figure = Figure(figsize=(15, 4))
    axes = figure.subplots(1, 3)
    accuracy = axes[0]
    for column, label in (
        ("train/acc_epoch", "train accuracy"),
        ("val/acc", "validation accuracy"),
        ("val/acc_mean", "verification accuracy (10-fold)"),
    ):
        if column in per_epoch:
            values = per_epoch[column].dropna()
            accuracy.plot(values.index, values, marker="o", label=label)
    if {"train/acc_epoch", "val/acc"} <= set(per_epoch.columns):
        gap = per_epoch["train/acc_epoch"] - per_epoch["val/acc"]
        accuracy.plot(per_epoch.index, gap, marker="o", linestyle="--", label="train - validation")
    accuracy.set_title("accuracy")
    accuracy.legend(fontsize=8)
    for axis, (name, columns) in zip(axes[1:], panels.items()):
        for column in columns:
            values = per_epoch[column].dropna()
            method, _, mask = column.removeprefix("monitor/").partition(f"/{name}/")
            axis.plot(
                values.index,
                values,
                marker="o",
                linestyle="-" if method == "fame" else ":",
                label=f"{method} on {mask}",
            )
        axis.set_title(f"monitor: {name.replace('_', ' ')} (validation probes)")
        axis.legend(fontsize=8)
    for axis in axes:
        axis.set_xlabel("epoch")
    return save_figure(figure, path)
