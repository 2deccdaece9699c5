"""Hydra multirun sweeps of the explain stage: one store per sweep point, in the point's own job folder.

Under ``explain.py -m`` each job (sweep point) writes its store to ``<job folder>/maps.zarr``, and
Hydra records the overrides that define the point in ``<job folder>/.hydra/overrides.yaml``
(``configs/explain.yaml`` turns Hydra's per-job files on for multirun jobs only, through
:func:`job_files_subdir`). ``evaluate.py sweep=<sweep folder>`` reads back exactly two plain
things per job, as data: the override strings and the store path. The ``config.yaml`` Hydra saves
beside them is never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from .report.statistics import parse_override_value

#: Hydra's per-job folder (its ``output_subdir``) inside each job folder of a multirun.
JOB_FILES = ".hydra"
#: The store of a sweep point, inside its job folder.
STORE_NAME = "maps.zarr"


def job_files_subdir(mode: Any) -> Optional[str]:
    """Hydra's ``output_subdir`` for a run mode: its per-job files for a multirun job, none for a single run."""
    return JOB_FILES if mode in (RunMode.MULTIRUN, RunMode.MULTIRUN.name) else None


def prepare_sweep_job(config: DictConfig) -> None:
    """Under ``-m``: put this sweep point's store in its job folder. Outside multirun: nothing."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    with open_dict(config):
        config.store = str(Path(HydraConfig.get().runtime.output_dir) / STORE_NAME)


def _job_order(job: Path) -> Tuple[int, Union[int, str]]:
    """Job folders by number (Hydra names them by ``hydra.job.num``), other names after them."""
    return (0, int(job.name)) if job.name.isdigit() else (1, job.name)


def read_overrides(path: Union[str, Path]) -> Dict[str, Any]:
    """The ``key=value`` overrides of a Hydra ``overrides.yaml`` as {key: value}, numbers as numbers.

    The file is read as plain YAML data (a list of strings); anything else is refused.
    """
    path = Path(path)
    try:
        listed = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not YAML ({error})") from None
    if listed is None:
        listed = []
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise ValueError(f"{path} should list Hydra overrides as strings (key=value), got {str(listed)[:80]!r}")
    pairs = (item.split("=", 1) for item in listed if "=" in item)
    return {key: parse_override_value(value) for key, value in pairs}


def read_sweep(folder: Union[str, Path]) -> List[Dict[str, Any]]:
    """The sweep points of a multirun folder: {"store": path, "overrides": {key: value}} per job.

    A job is a folder holding Hydra's ``.hydra/overrides.yaml``; its store is ``maps.zarr`` beside
    it. Jobs come in the order of their numbers; numeric override values are numbers ("25" -> 25).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no sweep folder at {folder}; `explain.py -m ...` writes one, <paths.experiment_dir>/multirun by default"
        )
    jobs = sorted((found.parent.parent for found in folder.glob(f"*/{JOB_FILES}/overrides.yaml")), key=_job_order)
    return [
        {"store": str(job / STORE_NAME), "overrides": read_overrides(job / JOB_FILES / "overrides.yaml")}
        for job in jobs
    ]
