"""Config mechanism shared by train.py, explain.py and evaluate.py.

Components are built from config nodes that name their class or function in ``_target_`` (Hydra's
instantiate), so every dataset of :mod:`fame.data` and every model of :mod:`fame.models` is
reachable from the command line. Entry points check their config against their schema
(:mod:`fame.schemas`) before anything is built.

Files are data: what a file the project reads may name is checked by :mod:`fame.files`
(:data:`FILE_BUILDERS`, :func:`check_file_data`); :func:`trusted_file` reads which files the
user trusts (``trust=[PATH]``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig

from .files import (  # noqa: F401  (re-exported: the config mechanism's public names)
    FILE_BUILDERS,
    HYDRA_KEYS,
    ConfigError,
    UntrustedFileError,
    check_arguments,
    check_file_data,
    config_targets,
    file_builders,
    instantiate,
    plain,
    trust_hint,
)


def config_digest(config: Any, exclude: Iterable[str] = ()) -> str:
    """A short, stable hash of a config (top-level keys in ``exclude`` left out)."""
    values = plain(config)
    if isinstance(values, dict):
        values = {k: v for k, v in values.items() if k not in set(exclude)}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def lookup(config: Any, key: str, default: Any = KeyError) -> Any:
    """The value at dotted ``key`` of a plain or OmegaConf config."""
    node = config
    for part in key.split("."):
        if isinstance(node, (dict, DictConfig)) and part in node:
            node = node[part]
        else:
            if default is KeyError:
                raise ConfigError(f"config key {key!r} is missing")
            return default
    return plain(node)


# ----------------------------------------------------------------------------------------------
# Files are data


def trusted_file(config: Any, path: Any) -> bool:
    """Whether the user named ``path`` in the config key ``trust`` (a path or a list of paths)."""
    value = lookup(config, "trust", default=None)
    entries = [value] if isinstance(value, (str, os.PathLike)) else value or []
    if not isinstance(entries, list) or not all(isinstance(entry, (str, os.PathLike)) for entry in entries):
        raise ConfigError(
            f"config key 'trust' has the value {value!r}; allowed: a list of paths of files you made "
            "yourself (stores, checkpoints, sweep indexes), e.g. trust=[outputs/explain/maps.zarr]"
        )
    wanted = Path(path).resolve()
    return any(Path(entry).resolve() == wanted for entry in entries)
