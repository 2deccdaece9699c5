"""Figures of the evaluate stage: curves with their bootstrap bands, sweeps and the sanity cascade.

Built on :class:`matplotlib.figure.Figure` objects, without pyplot and without choosing a
backend, so they draw headless and leave an interactive session's backend alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..metrics.sanity import RANDOMIZATION_METRICS
from .statistics import summarize, sweep_axis

#: How the sanity plot names each randomization.
RANDOMIZATION_LABELS = {"reinit": "layers re-initialised", "redraw": "layers redrawn from their own mean / std"}


def _band(axis, x, row_means, lows, highs, label) -> None:
    (line,) = axis.plot(x, row_means, marker="o", markersize=3, linewidth=1.4, label=label)
    axis.fill_between(x, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)


def save_figure(figure: Figure, path: Union[str, Path]) -> Path:
    """Lay out ``figure`` and write it to ``path`` (a PNG at 110 dpi), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _panel_grid(count: int):
    """A figure with ``count`` panels, three per row."""
    columns = min(3, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows))
    return figure, figure.subplots(rows, columns, squeeze=False)


def plot_curves(
    summary: pd.DataFrame, metric_prefix: str, path: Union[str, Path], methods: Optional[Sequence[str]] = None
) -> Path:
    """PNG of every curve metric whose name starts with ``metric_prefix``: one panel per metric.

    x = level, y = mean with its confidence band, one line per method (e.g. prefix "road_morf"
    gives the MoRF panels of both imputations, "deletion" the RISE deletion curve).
    """
    curves = summary[summary["metric"].str.startswith(metric_prefix) & summary["level"].notna()]
    metrics = [m for m, group in curves.groupby("metric", sort=False) if group["level"].nunique() > 1]
    if not metrics:
        available = sorted(summary.loc[summary["level"].notna(), "metric"].unique())
        raise ValueError(f"no curve metric starts with {metric_prefix!r}; curve metrics in the summary: {available}")
    methods = list(methods) if methods is not None else list(dict.fromkeys(curves["method"]))
    figure, axes = _panel_grid(len(metrics))
    for axis, metric in zip(axes.flat, metrics):
        for method in methods:
            line = curves[(curves["metric"] == metric) & (curves["method"] == method)].sort_values("level")
            if not line.empty:
                _band(axis, line["level"], line["mean"], line["low"], line["high"], method)
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel("level")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    return save_figure(figure, path)


def plot_sweep(
    table: pd.DataFrame,
    parameter: str,
    path: Union[str, Path],
    metrics: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
) -> Path:
    """PNG of each scalar metric of a :func:`sweep_table` against the swept value, one line per method, CI bands.

    ``metrics`` picks the panels (default: every scalar metric, i.e. level NaN, including the
    derived ``_auc`` areas). Values "name=number" are plotted on a numeric axis named ``name``.
    """
    scalars = table[table["level"].isna()]
    metrics = list(metrics) if metrics is not None else list(dict.fromkeys(scalars["metric"]))
    unknown = [m for m in metrics if m not in set(scalars["metric"])]
    if unknown or not metrics:
        raise ValueError(
            f"no scalar metric {unknown or ''} in the sweep table; it has {sorted(set(scalars['metric']))}"
        )
    values = list(dict.fromkeys(table[parameter]))
    positions, ticks, label = sweep_axis(values, parameter)
    where = dict(zip(values, positions))
    methods = list(methods) if methods is not None else list(dict.fromkeys(scalars["method"]))
    figure, axes = _panel_grid(len(metrics))
    for axis, metric in zip(axes.flat, metrics):
        for method in methods:
            line = scalars[(scalars["metric"] == metric) & (scalars["method"] == method)]
            if line.empty:
                continue
            x = line[parameter].map(where).to_numpy(dtype=float)
            order = np.argsort(x)
            _band(
                axis,
                x[order],
                line["mean"].to_numpy()[order],
                line["low"].to_numpy()[order],
                line["high"].to_numpy()[order],
                method,
            )
        if ticks is not None:
            axis.set_xticks(positions, ticks, rotation=30, ha="right", fontsize=7)
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    return save_figure(figure, path)


def plot_sanity(
    summary_or_frame: pd.DataFrame,
    layer_names: Sequence[str],
    path: Union[str, Path],
    methods: Optional[Sequence[str]] = None,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> Path:
    """PNG of the cascading randomization: two panels (Spearman, SSIM), one line per method.

    x = cascade step 1..L labelled with ``layer_names`` (the module randomized at that step, the
    steps before it kept), y = the mean over samples with its bootstrap band. Takes a
    :func:`~fame.report.statistics.summarize` result or the long score table (summarized here with
    ``confidence``, ``resamples`` and ``seed``); rows of other metrics are ignored. The titles
    name the randomization of the rows (re-initialisation where both are present).
    """
    present = set(summary_or_frame["metric"])
    randomization = next((kind for kind, names in RANDOMIZATION_METRICS.items() if present & set(names)), None)
    if randomization is None:
        known = [name for names in RANDOMIZATION_METRICS.values() for name in names]
        raise ValueError(f"no {' or '.join(known)} rows to plot; run the sanity check first")
    metrics = RANDOMIZATION_METRICS[randomization]
    table = summary_or_frame[summary_or_frame["metric"].isin(metrics)]
    if "mean" not in table.columns:
        table = summarize(table, confidence=confidence, resamples=resamples, seed=seed, curve_auc=False)
    table = table[table["level"].notna()]
    if table.empty:
        raise ValueError(f"no {' or '.join(metrics)} curve rows to plot; run the sanity check first")
    methods = list(methods) if methods is not None else list(dict.fromkeys(table["method"]))
    steps = int(table["level"].max())
    labels = [layer_names[k] if k < len(layer_names) else str(k + 1) for k in range(steps)]
    width = max(4.5, 0.55 * steps + 2.5)
    figure = Figure(figsize=(2 * width, 4.0))
    axes = figure.subplots(1, 2, squeeze=False)
    spearman, ssim = metrics
    kind = RANDOMIZATION_LABELS[randomization]
    titles = {
        spearman: f"Spearman rank correlation with the intact model's maps ({kind})",
        ssim: f"SSIM with the intact model's maps ({kind})",
    }
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for axis, metric in zip(axes.flat, metrics):
        lowest = 0.0
        for position, method in enumerate(methods):  # a method keeps its colour in both panels
            line = table[(table["metric"] == metric) & (table["method"] == method)].sort_values("level")
            if line.empty:
                continue
            color = colors[position % len(colors)]
            (handles[method],) = axis.plot(
                line["level"], line["mean"], marker="o", markersize=3, linewidth=1.4, color=color, label=method
            )
            axis.fill_between(line["level"], line["low"], line["high"], color=color, alpha=0.2, linewidth=0)
            lowest = min(lowest, float(np.nanmin(line["low"])))
        axis.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
        axis.set_ylim(lowest - 0.05, 1.05)
        axis.set_xticks(range(1, steps + 1))
        axis.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        axis.set_xlim(0.7, steps + 0.3)
        axis.set_xlabel("randomized from the output down to")
        axis.set_title(titles[metric], fontsize=9)
        axis.grid(alpha=0.3)
    axes.flat[0].legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles], fontsize=7)
    return save_figure(figure, path)
