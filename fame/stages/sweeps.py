"""Hydra multirun sweeps of the explain stage: one store per sweep point, listed in a sweep index."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict


def prepare_sweep_job(config: DictConfig) -> None:
    """Under ``-m``: give this sweep point its own store in the sweep folder and record it in the index.

    The index (``<sweep dir>/sweep.jsonl``) holds one JSON line per point with its store and the
    overrides that define it; ``evaluate.py sweep=<index>`` reads it. Outside multirun: nothing.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    from ..report import write_sweep_entry

    hydra = HydraConfig.get()
    sweep_dir = Path(hydra.sweep.dir)
    overrides = dict(override.split("=", 1) for override in hydra.overrides.task if "=" in override)
    with open_dict(config):
        config.store = str(sweep_dir / str(hydra.job.num) / "maps.zarr")
        config.sweep_index = str(sweep_dir / "sweep.jsonl")
    write_sweep_entry(config.sweep_index, config.store, overrides)
