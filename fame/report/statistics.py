"""Summaries of the long score table: per-sample curve areas and percentile-bootstrap intervals.

Scores come as a long table, one row per (method, metric, level, sample): columns ``method``,
``metric``, ``level`` (the removal percentage, fraction or threshold of a curve; NaN for a scalar
metric), ``value`` and ``sample_id``. :func:`summarize` turns it into mean and percentile-bootstrap
confidence interval per (method, metric, level) (docs/method.md#reporting); :func:`sweep_table`
stacks the summaries of the points of a sweep. Pure pandas / numpy.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

SCORE_COLUMNS = ("method", "metric", "level", "value", "sample_id")
SUMMARY_COLUMNS = ("method", "metric", "level", "n", "mean", "low", "high")
#: Suffix of the per-sample area under a curve metric that :func:`summarize` derives.
AUC_SUFFIX = "_auc"


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
        parts.append(
            pd.DataFrame(
                {
                    "method": method,
                    "metric": metric + AUC_SUFFIX,
                    "level": np.nan,
                    "value": areas,
                    "sample_id": table.index.to_numpy(),
                }
            )
        )
    if not parts:
        return pd.DataFrame(
            {column: pd.Series(dtype=float if column in ("level", "value") else object) for column in SCORE_COLUMNS}
        )
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


def summarize(
    frame: pd.DataFrame, confidence: float = 0.95, resamples: int = 1000, seed: int = 0, curve_auc: bool = True
) -> pd.DataFrame:
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


def parse_override_value(text: Any) -> Any:
    """A Hydra override value as a number when it is one ("25" -> 25, "0.5" -> 0.5), else unchanged."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep_axis(values: Sequence[Any], parameter: str) -> Tuple[np.ndarray, Optional[List[str]], str]:
    """x positions, tick labels (None for a numeric axis) and the axis label of sweep values.

    Numbers stay numbers; labels "name=number" sharing one name become that number on an axis
    called name (the evaluate stage labels sweep points by their overrides); anything else is
    placed evenly in the given order.
    """
    parsed = [parse_override_value(v) for v in values]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed):
        return np.asarray(parsed, dtype=float), None, parameter
    pairs = [str(v).split("=", 1) for v in values]
    if all(len(p) == 2 for p in pairs) and len({p[0] for p in pairs}) == 1:
        numbers = [parse_override_value(p[1]) for p in pairs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            return np.asarray(numbers, dtype=float), None, pairs[0][0]
    return np.arange(len(values), dtype=float), [str(v) for v in values], parameter


def sweep_table(
    frames_by_value: Mapping[Any, pd.DataFrame],
    parameter: str,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`summarize` of each sweep point's scores, stacked, with the swept value in column ``parameter``.

    ``frames_by_value`` maps each value of the swept parameter (e.g. FAME iterations 25, 50, 100, or
    labels such as "explainer.iterations=25") to that point's long score table. Rows are ordered by
    the value (numerically where the values are numbers), then as :func:`summarize` orders them.
    """
    if not frames_by_value:
        raise ValueError("sweep_table needs the scores of at least one sweep point")
    values = list(frames_by_value)
    positions, _, _ = sweep_axis(values, parameter)
    order = np.argsort(positions, kind="stable")
    parts = []
    for index in order:
        value = values[index]
        summary = summarize(frames_by_value[value], confidence=confidence, resamples=resamples, seed=seed)
        parts.append(summary.assign(**{parameter: value}))
    table = pd.concat(parts, ignore_index=True)
    return table[[parameter, *SUMMARY_COLUMNS]]
