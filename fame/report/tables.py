"""Markdown tables of a :func:`fame.report.statistics.summarize` result, laid out like the FAME paper's.

:func:`markdown_table` gives one row per method with cells "mean [low, high]": Tab. 1
(classification: localisation, ROAD, deletion / insertion) and Tab. 2 (face verification) of the
paper with the columns present, then every other scalar metric (docs/method.md#reporting).
Built with tabulate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from tabulate import DataRow, TableFormat, tabulate

from .statistics import AUC_SUFFIX


@dataclass(frozen=True)
class Column:
    """One table column: the summary row of ``metric`` at ``level`` (None: scalar), times ``scale``."""

    label: str
    metric: str
    level: Optional[float] = None
    scale: float = 1.0


def _road_columns(quantity: str) -> List[Column]:
    return [
        Column(f"ROAD {order_label} {imputation} Δlogit", f"road_{order}_{imputation}_{quantity}{AUC_SUFFIX}")
        for imputation in ("zero", "linear")
        for order, order_label in (("morf", "MoRF"), ("lerf", "LeRF"))
    ]


#: Deletion / insertion protocols by the suffix of their metric names, as the table labels them
#: (fame.metrics.faithfulness: "fame" ours, "rise" Petsiuk et al.'s CausalMetric).
DELETION_PROTOCOLS = (("", "FAME protocol"), ("_rise", "RISE protocol"))


def _deletion_columns() -> List[Column]:
    return [
        Column(f"{mode.capitalize()} AUC ×100 ({label})", f"{mode}{suffix}{AUC_SUFFIX}", scale=100.0)
        for suffix, label in DELETION_PROTOCOLS
        for mode in ("deletion", "insertion")
    ]


#: Paper Tab. 1 (classification): IoU of {map >= t} with the box x100; ROAD logit drop averaged over
#: P = 0..100% (normalized AUC; MoRF: higher is better, LeRF: lower is better) with zero and noisy
#: linear imputation; deletion / insertion AUC x100, labelled with their protocol.
TABLE1_COLUMNS: Tuple[Column, ...] = (
    Column("IoU@0.3 ×100", "iou_30", scale=100.0),
    Column("IoU@0.5 ×100", "iou_50", scale=100.0),
    Column("IoU@0.7 ×100", "iou_70", scale=100.0),
    *_road_columns("logit_drop"),
    *_deletion_columns(),
)
#: Paper Tab. 2 (face verification): accuracy at the clean EER threshold while deleting / inserting
#: the probe's top P% e+ pixels, normalized AUC x100 (already scaled by the evaluate stage).
TABLE2_COLUMNS: Tuple[Column, ...] = (
    Column("Deletion AUC ×100 (lower is better)", "verification_deletion_auc"),
    Column("Insertion AUC ×100 (higher is better)", "verification_insertion_auc"),
)


#: Column labels of the scalar metrics outside Tab. 1 (IoU x100 as in Tab. 1).
METRIC_LABELS: Dict[str, Tuple[str, float]] = {
    "pointing_game": ("pointing game (0 px)", 1.0),
    "pointing_game_15px": ("pointing game (15 px at 224 px)", 1.0),
    "relevance_mass": ("relevance mass", 1.0),
    "relevance_rank": ("relevance rank", 1.0),
    "pr_auc": ("PR AUC", 1.0),
    "iou_30": ("IoU@0.3 ×100", 100.0),
    "iou_50": ("IoU@0.5 ×100", 100.0),
    "iou_70": ("IoU@0.7 ×100", 100.0),
    "sanity_spearman_auc": ("sanity Spearman, layers re-initialised (area over the cascade)", 1.0),
    "sanity_ssim_auc": ("sanity SSIM, layers re-initialised (area over the cascade)", 1.0),
    "sanity_redraw_spearman_auc": (
        "sanity Spearman, layers redrawn from their own mean / std (area over the cascade)",
        1.0,
    ),
    "sanity_redraw_ssim_auc": ("sanity SSIM, layers redrawn from their own mean / std (area over the cascade)", 1.0),
}


def _scalar_column(metric: str) -> Column:
    """A labelled column for a scalar metric; ``name@mask`` (a second mask key) keeps its suffix."""
    name, _, mask = metric.partition("@")
    if name not in METRIC_LABELS:
        return Column(metric, metric)
    label, scale = METRIC_LABELS[name]
    return Column(f"{label} @{mask}" if mask else label, metric, scale=scale)


def _as_column(spec: Union[Column, str, Tuple[str, float]]) -> Column:
    if isinstance(spec, Column):
        return spec
    if isinstance(spec, str):
        return Column(spec, spec)
    if isinstance(spec, tuple) and len(spec) == 2:
        metric, level = spec
        return Column(f"{metric}@{level:g}", metric, float(level))
    raise TypeError(f"a table column is a Column, a metric name or a (metric, level) pair, got {spec!r}")


def _summary_lookup(summary: pd.DataFrame) -> Dict[Tuple[str, str, Optional[float]], pd.Series]:
    lookup = {}
    for row in summary.itertuples(index=False):
        level = None if pd.isna(row.level) else float(row.level)
        lookup[(row.method, row.metric, level)] = row
    return lookup


def _cell(row, scale: float, digits: int) -> str:
    if row is None:
        return "–"
    mean, low, high = (scale * getattr(row, name) for name in ("mean", "low", "high"))
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


#: GitHub markdown without column padding: "| a | b |" rows under a "|---|---|" rule.
MARKDOWN = TableFormat(
    lineabove=None,
    linebelowheader=lambda widths, aligns: "|" + "---|" * len(widths),
    linebetweenrows=None,
    linebelow=None,
    headerrow=DataRow("| ", " | ", " |"),
    datarow=DataRow("| ", " | ", " |"),
    padding=0,
    with_header_hide=None,
)


def _table(summary: pd.DataFrame, columns: Sequence[Column], methods: Sequence[str], digits: int) -> str:
    lookup = _summary_lookup(summary)
    rows = []
    for method in methods:
        found = [lookup.get((method, c.metric, c.level)) for c in columns]
        if all(row is None for row in found):  # e.g. the e- maps in the e+ deletion table
            continue
        rows.append([method, *(_cell(row, c.scale, digits) for row, c in zip(found, columns))])
    return tabulate(
        rows,
        headers=["method", *(column.label for column in columns)],
        tablefmt=MARKDOWN,
        stralign=None,
        numalign=None,
        disable_numparse=True,
    )


def _present(summary: pd.DataFrame, columns: Iterable[Column]) -> List[Column]:
    keys = set(_summary_lookup(summary))
    metrics = {(metric, level) for _, metric, level in keys}
    return [c for c in columns if (c.metric, c.level) in metrics]


def markdown_table(
    summary: pd.DataFrame,
    metrics: Optional[Sequence[Union[Column, str, Tuple[str, float]]]] = None,
    *,
    methods: Optional[Sequence[str]] = None,
    missing_methods: Sequence[str] = (),
    excluded: Optional[Mapping[str, Union[int, Sequence[str]]]] = None,
    digits: int = 1,
    confidence: float = 0.95,
) -> str:
    """Markdown table(s) of a :func:`~fame.report.statistics.summarize` result: one row per method,
    cells "mean [low, high]".

    ``metrics`` lists the columns (a :class:`Column`, a scalar metric's name or a (metric, level)
    pair). Without it the tables follow the paper: Tab. 1 (:data:`TABLE1_COLUMNS`) and Tab. 2
    (:data:`TABLE2_COLUMNS`) with the columns present, then every other scalar metric. Rows follow
    ``methods`` (default: as they come in the summary). The notes name ``missing_methods`` (requested
    but absent from the store) and the samples ``excluded`` per method (a count or the ids, e.g.
    the empty FAME maps of samples that took no step). ``confidence`` is only quoted in the header.
    """
    methods = list(methods) if methods is not None else list(dict.fromkeys(summary["method"]))
    percent = f"{100 * confidence:g}%"
    sections = []
    if metrics is not None:
        sections.append(_table(summary, [_as_column(spec) for spec in metrics], methods, digits))
    else:
        shown = set()
        for title, preset in (
            ("Localisation and faithfulness (paper Tab. 1)", TABLE1_COLUMNS),
            ("Face verification (paper Tab. 2)", TABLE2_COLUMNS),
        ):
            columns = _present(summary, preset)
            if columns:
                sections.append(f"### {title}\n\n" + _table(summary, columns, methods, digits))
                shown.update((c.metric, c.level) for c in columns)
        scalars = [m for m in dict.fromkeys(summary.loc[summary["level"].isna(), "metric"]) if (m, None) not in shown]
        if scalars:
            title = "Other metrics" if sections else "Metrics"
            columns = [_scalar_column(m) for m in scalars]
            sections.append(f"### {title}\n\n" + _table(summary, columns, methods, max(digits, 3)))
    notes = [f"Mean [{percent} percentile-bootstrap interval] over samples."]
    counts = summary["n"]
    if len(counts):
        most = f" to {int(counts.max())}." if counts.max() != counts.min() else "."
        notes.append(f"Samples per cell: {int(counts.min())}" + most)
    if missing_methods:
        notes.append(f"Missing from the store (not scored): {', '.join(map(str, missing_methods))}.")
    if excluded:
        counted = {
            method: value if isinstance(value, (int, np.integer)) else len(value) for method, value in excluded.items()
        }
        parts = [f"{method}: {count}" for method, count in counted.items() if count]
        if parts:
            notes.append("Samples excluded (maps without any FAME step, i.e. empty): " + ", ".join(parts) + ".")
    return "\n\n".join(sections) + "\n\n" + "\n".join(f"> {note}" for note in notes) + "\n"
