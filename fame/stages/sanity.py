"""The figure of the model-randomisation sanity check (Adebayo et al., NeurIPS 2018) of the evaluate stage.

The records it draws come from :func:`fame.pipeline.sanity_records`: per method, metric
"sanity_spearman" | "sanity_ssim" ("sanity_redraw_..." for ``sanity.randomization: redraw``) at
level = cascade step l, comparing the maps after step l (blocks ``layers[:l]`` randomized) with the
intact model's maps. A method whose maps reflect the model falls towards 0; one that stays near 1
(the "random", "centre" and "sobel" floors by construction) does not depend on the model's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..pipeline import RANDOMIZATION_METRICS

#: How the plot names each randomization.
RANDOMIZATION_LABELS = {"reinit": "layers re-initialised", "redraw": "layers redrawn from their own mean / std"}


def plot_sanity(summary_or_frame: pd.DataFrame, layer_names: Sequence[str], path: Union[str, Path],
                methods: Optional[Sequence[str]] = None, confidence: float = 0.95, resamples: int = 1000,
                seed: int = 0) -> Path:
    """PNG of the cascading randomization: two panels (Spearman, SSIM), one line per method.

    x = cascade step 1..L labelled with ``layer_names`` (the module randomized at that step, the
    steps before it kept), y = the mean over samples with its bootstrap band. Takes a
    :func:`fame.report.summarize` result or the long score table (summarized here with
    ``confidence``, ``resamples`` and ``seed``); rows of other metrics are ignored. The titles
    name the randomization of the rows (re-initialisation where both are present).
    """
    from .. import report

    present = set(summary_or_frame["metric"])
    randomization = next((kind for kind, names in RANDOMIZATION_METRICS.items() if present & set(names)), None)
    if randomization is None:
        known = [name for names in RANDOMIZATION_METRICS.values() for name in names]
        raise ValueError(f"no {' or '.join(known)} rows to plot; run the sanity check first")
    metrics = RANDOMIZATION_METRICS[randomization]
    table = summary_or_frame[summary_or_frame["metric"].isin(metrics)]
    if "mean" not in table.columns:
        table = report.summarize(table, confidence=confidence, resamples=resamples, seed=seed, curve_auc=False)
    table = table[table["level"].notna()]
    if table.empty:
        raise ValueError(f"no {' or '.join(metrics)} curve rows to plot; run the sanity check first")
    methods = list(methods) if methods is not None else list(dict.fromkeys(table["method"]))
    steps = int(table["level"].max())
    labels = [layer_names[k] if k < len(layer_names) else str(k + 1) for k in range(steps)]
    width = max(4.5, 0.55 * steps + 2.5)
    figure, axes = report.plt.subplots(1, 2, figsize=(2 * width, 4.0), squeeze=False)
    spearman, ssim = metrics
    titles = {spearman: f"Spearman rank correlation with the intact model's maps ({RANDOMIZATION_LABELS[randomization]})",
              ssim: f"SSIM with the intact model's maps ({RANDOMIZATION_LABELS[randomization]})"}
    colors = report.plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for axis, metric in zip(axes.flat, metrics):
        lowest = 0.0
        for position, method in enumerate(methods):  # a method keeps its colour in both panels
            line = table[(table["metric"] == metric) & (table["method"] == method)].sort_values("level")
            if line.empty:
                continue
            color = colors[position % len(colors)]
            handles[method], = axis.plot(line["level"], line["mean"], marker="o", markersize=3, linewidth=1.4,
                                         color=color, label=method)
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
    return report._save(figure, path)
