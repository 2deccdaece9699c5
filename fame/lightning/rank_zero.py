"""Loggers whose records are emitted by global rank zero only, so a DDP run reports each line once
(README, Layout: the entry points show the ``fame`` loggers on the console)."""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


class RankZeroFilter(logging.Filter):
    """Passes a record on global rank zero only: Lightning's ``rank_zero_only.rank``, read from the
    launcher's environment (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) at import and set by the
    strategy once a Trainer runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return rank_zero_only.rank == 0


def rank_zero_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with a :class:`RankZeroFilter`: the other ranks drop its records."""
    logger = logging.getLogger(name)
    if not any(isinstance(existing, RankZeroFilter) for existing in logger.filters):
        logger.addFilter(RankZeroFilter())
    return logger
