"""Hydra multirun sweeps of the explain stage: one store per sweep point, listed in a sweep index.

The index (``<sweep dir>/sweep.jsonl``) is JSON lines, one object per sweep point: its ``store``
and the ``overrides`` that define it; ``evaluate.py sweep=<index>`` reads it back as data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from ..report.statistics import parse_override_value


def prepare_sweep_job(config: DictConfig) -> None:
    """Under ``-m``: give this sweep point its own store in the sweep folder and record it in the index.

    The index (``<sweep dir>/sweep.jsonl``) holds one JSON line per point with its store and the
    overrides that define it; ``evaluate.py sweep=<index>`` reads it. Outside multirun: nothing.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hydra = HydraConfig.get()
    sweep_dir = Path(hydra.sweep.dir)
    overrides = dict(override.split("=", 1) for override in hydra.overrides.task if "=" in override)
    with open_dict(config):
        config.store = str(sweep_dir / str(hydra.job.num) / "maps.zarr")
        config.sweep_index = str(sweep_dir / "sweep.jsonl")
    write_sweep_entry(config.sweep_index, config.store, overrides)


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
            raise ValueError(f"{path}, line {number} needs a \"store\" path and an \"overrides\" object, "
                             f"got {line[:80]!r}")
        entry["overrides"] = {key: parse_override_value(value) for key, value in entry["overrides"].items()}
        entries[entry["store"]] = entry
    return list(entries.values())
