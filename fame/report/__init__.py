"""Reports of the evaluate stage, by kind: :mod:`~fame.report.statistics` (summaries and bootstrap
intervals of the long score table), :mod:`~fame.report.tables` (the paper-shaped markdown tables)
and :mod:`~fame.report.figures` (curves, sweeps, the sanity cascade). See docs/method.md#reporting.
"""

from .figures import plot_curves, plot_sanity, plot_sweep
from .statistics import (
    AUC_SUFFIX,
    SCORE_COLUMNS,
    SUMMARY_COLUMNS,
    bootstrap_counts,
    check_scores,
    curve_areas,
    summarize,
    sweep_table,
)
from .tables import TABLE1_COLUMNS, TABLE2_COLUMNS, Column, markdown_table

__all__ = [
    "AUC_SUFFIX",
    "SCORE_COLUMNS",
    "SUMMARY_COLUMNS",
    "TABLE1_COLUMNS",
    "TABLE2_COLUMNS",
    "Column",
    "bootstrap_counts",
    "check_scores",
    "curve_areas",
    "markdown_table",
    "plot_curves",
    "plot_sanity",
    "plot_sweep",
    "summarize",
    "sweep_table",
]
