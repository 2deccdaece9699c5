"""Config mechanism shared by train.py, explain.py and evaluate.py.

Components are built from config nodes that name their class or function in ``_target_`` (Hydra's
instantiate), so every dataset of :mod:`fame.data` and every model of :mod:`fame.models` is
reachable from the command line. Entry points check their config against a schema before anything
is built: a wrong value is reported with its key, the value and what is allowed.

Files are data: what a file the project reads may name is checked by :mod:`fame.files`
(:data:`FILE_BUILDERS`, :func:`check_file_data`); :func:`trusted_file` reads which files the
user trusts (``trust=[PATH]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

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
    plain,
    trust_hint,
)


def instantiate(spec: Any, key: str, **extra: Any) -> Any:
    """Build the object a config node describes (``_target_`` plus keyword arguments).

    ``key`` names the node in error messages; ``extra`` keyword arguments are added to the call.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    if spec is None:
        raise ConfigError(f"{key} is not set; give it a config with a _target_")
    node = plain(spec) if isinstance(spec, DictConfig) else spec
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{key} must be a mapping with a _target_ naming the class or function to build, got {node!r}")
    try:
        return hydra_instantiate(node, **extra, _convert_="all")
    except InstantiationException as error:
        raise ConfigError(f"could not build {key} ({node['_target_']}): {error}") from error


def config_digest(config: Any, exclude: Iterable[str] = ()) -> str:
    """A short, stable hash of a config (top-level keys in ``exclude`` left out)."""
    values = plain(config)
    if isinstance(values, dict):
        values = {k: v for k, v in values.items() if k not in set(exclude)}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Schemas


@dataclass(frozen=True)
class Rule:
    """What one config key may hold: a type (int, float, str, bool), choices and a range."""

    kind: type
    choices: Optional[Sequence[Any]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    optional: bool = False
    help: str = ""

    def allowed(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[self.kind]
            if self.minimum is not None and self.maximum is not None:
                text += f" in [{self.minimum}, {self.maximum}]"
            elif self.minimum is not None:
                text += f" >= {self.minimum}"
            elif self.maximum is not None:
                text += f" <= {self.maximum}"
        if self.optional:
            text += " or null"
        return text + (f" ({self.help})" if self.help else "")

    def check(self, key: str, value: Any) -> None:
        def fail() -> None:
            raise ConfigError(f"config key {key!r} has the value {value!r}; allowed: {self.allowed()}")

        if value is None:
            if not self.optional:
                fail()
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                fail()
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                fail()
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail()
        elif not isinstance(value, self.kind):
            fail()
        if self.choices is not None and value not in self.choices:
            fail()
        if self.minimum is not None and value < self.minimum:
            fail()
        if self.maximum is not None and value > self.maximum:
            fail()


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


def validate(config: Any, schema: Mapping[str, Rule], optional_keys: Iterable[str] = ()) -> None:
    """Check every key of ``schema`` (dotted paths) and every ``batch_size`` anywhere in the tree."""
    absent = set(optional_keys)
    for key, rule in schema.items():
        value = lookup(config, key, default=None if key in absent else KeyError)
        if value is None and key in absent:
            continue
        rule.check(key, value)
    _check_batch_sizes(plain(config), "")


def check_entries(config: Any, key: str, allowed: Optional[Sequence[Any]] = None, each: Optional[Rule] = None,
                  increasing: bool = False) -> None:
    """``key`` holds a non-empty list whose entries are all in ``allowed``, all pass ``each`` and,
    with ``increasing``, strictly increase."""
    values = lookup(config, key)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"config key {key!r} has the value {values!r}; allowed: a non-empty list")
    if allowed is not None:
        unknown = [value for value in values if value not in allowed]
        if unknown:
            raise ConfigError(f"config key {key!r} has unknown entries {unknown}; allowed: {list(allowed)}")
    if each is not None:
        for value in values:
            each.check(key, value)
    if increasing and any(not later > earlier for earlier, later in zip(values, values[1:])):
        raise ConfigError(f"config key {key!r} has the value {values}; allowed: strictly increasing levels")


def _check_batch_sizes(node: Any, prefix: str) -> None:
    if isinstance(node, dict):
        for name, value in node.items():
            key = f"{prefix}{name}"
            if name == "batch_size" and value != "auto":
                Rule(int, minimum=1, optional=True, help='or "auto" where supported').check(key, value)
            _check_batch_sizes(value, key + ".")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_batch_sizes(value, f"{prefix}{index}.")


def check_fame_options(options: Mapping[str, Any], key: str):
    """A FameConfig from the FAME fields of ``options``; type and range errors name ``key.<field>``."""
    from .explain import FameConfig
    from .explain.registry import fame_config

    fields = {field.name: field for field in dataclasses.fields(FameConfig)}
    values = {}
    for name, value in plain(options).items():
        if name not in fields:
            continue
        default = fields[name].default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            Rule(float if isinstance(default, float) else int).check(f"{key}.{name}", value)
        values[name] = value
    try:
        return fame_config(values, "classification")
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from error


# ----------------------------------------------------------------------------------------------
# Files are data


def trusted_file(config: Any, path: Any) -> bool:
    """Whether the user named ``path`` in the config key ``trust`` (a path or a list of paths)."""
    value = lookup(config, "trust", default=None)
    entries = [value] if isinstance(value, (str, os.PathLike)) else value or []
    if not isinstance(entries, list) or not all(isinstance(entry, (str, os.PathLike)) for entry in entries):
        raise ConfigError(f"config key 'trust' has the value {value!r}; allowed: a list of paths of files you made "
                          "yourself (stores, checkpoints, sweep indexes), e.g. trust=[outputs/explain/maps.zarr]")
    wanted = Path(path).resolve()
    return any(Path(entry).resolve() == wanted for entry in entries)
