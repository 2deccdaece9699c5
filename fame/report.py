"""Reports of the evaluate stage: bootstrap summaries, the paper's tables, curves and sweeps.

Scores come as a long table, one row per (method, metric, level, sample): columns ``method``,
``metric``, ``level`` (the removal percentage, fraction or threshold of a curve; NaN for a scalar
metric), ``value`` and ``sample_id``. :func:`summarize` turns it into mean and percentile-bootstrap
confidence interval per (method, metric, level); :func:`markdown_table` lays the summary out like
Tab. 1 (classification) and Tab. 2 (face verification) of the FAME paper; :func:`plot_curves`
draws curves with their intervals; :func:`sweep_table` / :func:`plot_sweep` follow a metric across
the points of a sweep, whose stores are listed in a sweep index (:func:`write_sweep_entry`,
:func:`read_sweep_index`). Pure pandas / numpy / matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SCORE_COLUMNS = ("method", "metric", "level", "value", "sample_id")
SUMMARY_COLUMNS = ("method", "metric", "level", "n", "mean", "low", "high")
#: Suffix of the per-sample area under a curve metric that :func:`summarize` derives.
AUC_SUFFIX = "_auc"


# ----------------------------------------------------------------------------- summaries


def check_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """The long score table with its columns checked, ``level`` numeric (NaN for scalars) and ids as strings."""
    missing = [column for column in SCORE_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"the score table lacks the column(s) {missing}; it needs {list(SCORE_COLUMNS)} "
            "(one row per method, metric, level, sample; level empty for scalar metrics)"
        )
    frame = frame.loc[:, list(SCORE_COLUMNS)].copy()
    frame["level"] = pd.to_numeric(frame["level"].replace("", np.nan), errors="raise").astype(float)
    frame["value"] = pd.to_numeric(frame["value"], errors="raise").astype(float)
    frame["sample_id"] = frame["sample_id"].astype(str)
    frame["method"] = frame["method"].astype(str)
    frame["metric"] = frame["metric"].astype(str)
    return frame


def normalized_trapezoid(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Trapezoid area of each row of ``values`` (S, K) over ``levels`` (K,), divided by the level range."""
    widths = np.diff(levels)
    return ((values[:, 1:] + values[:, :-1]) * widths).sum(axis=1) / (2.0 * (levels[-1] - levels[0]))


def curve_areas(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-sample normalized trapezoid area of every curve metric, as scalar metrics ``<metric>_auc``.

    A curve metric is one with at least two finite levels. The area over the levels L_0 < ... < L_K
    is sum_k (v_k + v_{k+1}) (L_{k+1} - L_k) / 2 / (L_K - L_0), the protocol's normalized AUC
    (e.g. the mean ROAD logit drop over P = 0..100%). Samples lacking a level are left out.
    A metric whose ``_auc`` is already in the table (written by the evaluate stage) is not derived again.
    """
    frame = check_scores(frame)
    curves = frame[np.isfinite(frame["level"])]
    present = set(frame[["method", "metric"]].drop_duplicates().itertuples(index=False, name=None))
    parts = []
    for (method, metric), group in curves.groupby(["method", "metric"], sort=False):
        if (method, metric + AUC_SUFFIX) in present:
            continue
        table = group.pivot_table(index="sample_id", columns="level", values="value", aggfunc="mean").dropna()
        if table.shape[1] < 2 or table.empty:
            continue
        levels = table.columns.to_numpy(dtype=float)
        areas = normalized_trapezoid(table.to_numpy(dtype=float), levels)
        parts.append(pd.DataFrame({"method": method, "metric": metric + AUC_SUFFIX, "level": np.nan,
                                   "value": areas, "sample_id": table.index.to_numpy()}))
    if not parts:
        return pd.DataFrame({column: pd.Series(dtype=float if column in ("level", "value") else object)
                             for column in SCORE_COLUMNS})
    return pd.concat(parts, ignore_index=True)


def bootstrap_counts(size: int, resamples: int, seed: int) -> np.ndarray:
    """How often each of ``size`` samples is drawn in each of ``resamples`` resamples with replacement: (R, n).

    Seeded by (seed, size) only, so every group of the same size is resampled the same way: the
    intervals of methods scored on the same samples (sorted by id) come from paired resamples.
    """
    generator = np.random.default_rng([int(seed), int(size)])
    draws = generator.integers(0, size, size=(resamples, size))
    offsets = (np.arange(resamples) * size)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=resamples * size).reshape(resamples, size).astype(float)


def summarize(frame: pd.DataFrame, confidence: float = 0.95, resamples: int = 1000, seed: int = 0,
              curve_auc: bool = True) -> pd.DataFrame:
    """Mean and percentile-bootstrap interval per (method, metric, level).

    Non-finite values are dropped (``n`` counts the rest). Within a group the values are ordered by
    sample id; each of ``resamples`` resamples draws n of them with replacement (see
    :func:`bootstrap_counts`), and ``low`` / ``high`` are the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of the resampled means. Vectorized: all groups of one size cost a
    single (groups x n) @ (n x resamples) product. With ``curve_auc`` the per-sample area under each
    curve metric is summarized too (:func:`curve_areas`). Columns: :data:`SUMMARY_COLUMNS`, level NaN
    for scalar metrics.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if int(resamples) < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples}")
    frame = check_scores(frame)
    if curve_auc:
        frame = pd.concat([frame, curve_areas(frame)], ignore_index=True)
    frame = frame[np.isfinite(frame["value"])]
    frame = frame.sort_values(["method", "metric", "level", "sample_id"], kind="stable", na_position="last")
    if frame.empty:
        return pd.DataFrame({column: [] for column in SUMMARY_COLUMNS})
    codes = frame.groupby(["method", "metric", "level"], sort=False, dropna=False).ngroup().to_numpy()
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    sizes = np.diff(np.r_[starts, len(codes)])
    values = frame["value"].to_numpy(dtype=float)
    means, lows, highs = (np.empty(len(starts)) for _ in range(3))
    tail = (1.0 - confidence) / 2.0
    for size in np.unique(sizes):
        groups = np.flatnonzero(sizes == size)
        block = values[starts[groups][:, None] + np.arange(size)]
        resampled = block @ bootstrap_counts(int(size), int(resamples), seed).T / size
        means[groups] = block.mean(axis=1)
        lows[groups], highs[groups] = np.quantile(resampled, [tail, 1.0 - tail], axis=1)
    keys = frame.iloc[starts][["method", "metric", "level"]].reset_index(drop=True)
    return keys.assign(n=sizes, mean=means, low=lows, high=highs)


# ----------------------------------------------------------------------------- tables


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
    return [Column(f"{mode.capitalize()} AUC ×100 ({label})", f"{mode}{suffix}{AUC_SUFFIX}", scale=100.0)
            for suffix, label in DELETION_PROTOCOLS for mode in ("deletion", "insertion")]


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
    "sanity_redraw_spearman_auc": ("sanity Spearman, layers redrawn from their own mean / std (area over the cascade)", 1.0),
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


def _table(summary: pd.DataFrame, columns: Sequence[Column], methods: Sequence[str], digits: int) -> str:
    lookup = _summary_lookup(summary)
    lines = ["| method | " + " | ".join(column.label for column in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in methods:
        rows = [lookup.get((method, c.metric, c.level)) for c in columns]
        if all(row is None for row in rows):  # e.g. the e- maps in the e+ deletion table
            continue
        cells = [_cell(row, c.scale, digits) for row, c in zip(rows, columns)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    """Markdown table(s) of a :func:`summarize` result: one row per method, cells "mean [low, high]".

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
        for title, preset in (("Localisation and faithfulness (paper Tab. 1)", TABLE1_COLUMNS),
                              ("Face verification (paper Tab. 2)", TABLE2_COLUMNS)):
            columns = _present(summary, preset)
            if columns:
                sections.append(f"### {title}\n\n" + _table(summary, columns, methods, digits))
                shown.update((c.metric, c.level) for c in columns)
        scalars = [m for m in dict.fromkeys(summary.loc[summary["level"].isna(), "metric"]) if (m, None) not in shown]
        if scalars:
            title = "Other metrics" if sections else "Metrics"
            sections.append(f"### {title}\n\n" + _table(summary, [_scalar_column(m) for m in scalars], methods, max(digits, 3)))
    notes = [f"Mean [{percent} percentile-bootstrap interval] over samples."]
    counts = summary["n"]
    if len(counts):
        notes.append(f"Samples per cell: {int(counts.min())}" + (f" to {int(counts.max())}." if counts.max() != counts.min() else "."))
    if missing_methods:
        notes.append(f"Missing from the store (not scored): {', '.join(map(str, missing_methods))}.")
    if excluded:
        parts = [f"{method}: {value if isinstance(value, (int, np.integer)) else len(value)}"
                 for method, value in excluded.items() if (value if isinstance(value, (int, np.integer)) else len(value))]
        if parts:
            notes.append("Samples excluded (maps without any FAME step, i.e. empty): " + ", ".join(parts) + ".")
    return "\n\n".join(sections) + "\n\n" + "\n".join(f"> {note}" for note in notes) + "\n"


# ----------------------------------------------------------------------------- figures


def _band(axis, x, row_means, lows, highs, label) -> None:
    line, = axis.plot(x, row_means, marker="o", markersize=3, linewidth=1.4, label=label)
    axis.fill_between(x, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)


def _save(figure, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _panel_grid(count: int):
    """A figure with ``count`` panels, three per row."""
    columns = min(3, count)
    rows = math.ceil(count / columns)
    return plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)


def plot_curves(summary: pd.DataFrame, metric_prefix: str, path: Union[str, Path],
                methods: Optional[Sequence[str]] = None) -> Path:
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
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    return _save(figure, path)


# ----------------------------------------------------------------------------- sweeps


def _parse_value(text: Any) -> Any:
    """A Hydra override value as a number when it is one ("25" -> 25, "0.5" -> 0.5), else unchanged."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _sweep_axis(values: Sequence[Any], parameter: str) -> Tuple[np.ndarray, Optional[List[str]], str]:
    """x positions, tick labels (None for a numeric axis) and the axis label of sweep values.

    Numbers stay numbers; labels "name=number" sharing one name become that number on an axis
    called name (the evaluate stage labels sweep points by their overrides); anything else is
    placed evenly in the given order.
    """
    parsed = [_parse_value(v) for v in values]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed):
        return np.asarray(parsed, dtype=float), None, parameter
    pairs = [str(v).split("=", 1) for v in values]
    if all(len(p) == 2 for p in pairs) and len({p[0] for p in pairs}) == 1:
        numbers = [_parse_value(p[1]) for p in pairs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            return np.asarray(numbers, dtype=float), None, pairs[0][0]
    return np.arange(len(values), dtype=float), [str(v) for v in values], parameter


def sweep_table(frames_by_value: Mapping[Any, pd.DataFrame], parameter: str, confidence: float = 0.95,
                resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """:func:`summarize` of each sweep point's scores, stacked, with the swept value in column ``parameter``.

    ``frames_by_value`` maps each value of the swept parameter (e.g. FAME iterations 25, 50, 100, or
    labels such as "explainer.iterations=25") to that point's long score table. Rows are ordered by
    the value (numerically where the values are numbers), then as :func:`summarize` orders them.
    """
    if not frames_by_value:
        raise ValueError("sweep_table needs the scores of at least one sweep point")
    values = list(frames_by_value)
    positions, _, _ = _sweep_axis(values, parameter)
    order = np.argsort(positions, kind="stable")
    parts = []
    for index in order:
        value = values[index]
        summary = summarize(frames_by_value[value], confidence=confidence, resamples=resamples, seed=seed)
        parts.append(summary.assign(**{parameter: value}))
    table = pd.concat(parts, ignore_index=True)
    return table[[parameter, *SUMMARY_COLUMNS]]


def plot_sweep(table: pd.DataFrame, parameter: str, path: Union[str, Path],
               metrics: Optional[Sequence[str]] = None, methods: Optional[Sequence[str]] = None) -> Path:
    """PNG of each scalar metric of a :func:`sweep_table` against the swept value, one line per method, CI bands.

    ``metrics`` picks the panels (default: every scalar metric, i.e. level NaN, including the
    derived ``_auc`` areas). Values "name=number" are plotted on a numeric axis named ``name``.
    """
    scalars = table[table["level"].isna()]
    metrics = list(metrics) if metrics is not None else list(dict.fromkeys(scalars["metric"]))
    unknown = [m for m in metrics if m not in set(scalars["metric"])]
    if unknown or not metrics:
        raise ValueError(f"no scalar metric {unknown or ''} in the sweep table; it has {sorted(set(scalars['metric']))}")
    values = list(dict.fromkeys(table[parameter]))
    positions, ticks, label = _sweep_axis(values, parameter)
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
            _band(axis, x[order], line["mean"].to_numpy()[order], line["low"].to_numpy()[order],
                  line["high"].to_numpy()[order], method)
        if ticks is not None:
            axis.set_xticks(positions, ticks, rotation=30, ha="right", fontsize=7)
        axis.set_title(metric, fontsize=9)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    return _save(figure, path)


def write_sweep_entry(index_path: Union[str, Path], store: Union[str, Path], overrides: Mapping[str, Any],
                      **fields: Any) -> Dict[str, Any]:
    """Append one sweep point to the index: a JSON line {"store": ..., "overrides": {...}, **fields}.

    The index is JSON lines, one object per sweep point: ``store`` (the path of its map store),
    ``overrides`` (the Hydra overrides defining the point, e.g. {"explainer.iterations": "25"}) and
    any extra ``fields``. Safe with many processes appending at once: the line goes out in a single
    ``write`` on a descriptor opened with O_APPEND, so lines never interleave.
    """
    entry = {"store": str(store), "overrides": {str(k): v for k, v in dict(overrides).items()}, **fields}
    line = (json.dumps(entry, default=str) + "\n").encode("utf-8")
    index_path = Path(index_path)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(index_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        written = os.write(descriptor, line)
    finally:
        os.close(descriptor)
    if written != len(line):
        raise OSError(f"only {written} of {len(line)} bytes of a sweep entry reached {index_path} (disk full?)")
    return entry


def read_sweep_index(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The sweep points of an index written by :func:`write_sweep_entry`, in the order written.

    Numeric override values are returned as numbers ("25" -> 25). A store listed more than once
    (a sweep point rerun) appears once, with its latest entry, at the position of its first.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep index at {path}; `explain.py -m ...` writes <sweep dir>/sweep.jsonl")
    entries: Dict[str, Dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number} is not JSON ({error}): {line[:80]!r}") from None
        if not isinstance(entry, dict) or "store" not in entry or not isinstance(entry.get("overrides"), dict):
            raise ValueError(f"{path}, line {number} needs a \"store\" path and an \"overrides\" object, got {line[:80]!r}")
        entry["overrides"] = {key: _parse_value(value) for key, value in entry["overrides"].items()}
        entries[entry["store"]] = entry
    return list(entries.values())
