"""Config mechanism shared by train.py, explain.py and evaluate.py.

Components are built from config nodes that name their class or function in ``_target_`` (Hydra's
instantiate), so every dataset of :mod:`fame.data` and every model of :mod:`fame.models` is
reachable from the command line. Entry points check their config against a schema before anything
is built: a wrong value is reported with its key, the value and what is allowed.

Files are data: a ``_target_`` found in a file the project reads (a store's data config, a
checkpoint's hyper-parameters) is built only when it names one of the project's own builders
(:data:`FILE_BUILDERS`) or a target the user's own config names, unless the user trusts that file
(``trust=[PATH]``); see :func:`check_file_data`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range."""


class UntrustedFileError(ConfigError):
    """A file the project reads asks it to run code: a ``_target_`` that is none of the project's
    builders, an OmegaConf interpolation, a ``trust`` flag or pickled Python objects."""


def plain(config: Any) -> Any:
    """A config as plain Python containers (for checkpoints, attrs and hashing): OmegaConf nodes,
    also nested in dicts and lists, become dicts and lists; tuples become lists."""
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {str(key): plain(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [plain(value) for value in config]
    return config


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


def config_difference(stored: Any, requested: Any, prefix: str = "") -> Dict[str, Tuple[Any, Any]]:
    """Dotted keys whose values differ between two plain configs: {key: (stored, requested)}."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out: Dict[str, Tuple[Any, Any]] = {}
        for name in sorted(set(stored) | set(requested), key=str):
            out.update(config_difference(stored.get(name), requested.get(name), f"{prefix}{name}."))
        return out
    return {} if stored == requested else {prefix.rstrip("."): (stored, requested)}


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

#: What a file may ask the project to build: its own datasets, data modules, classifiers, face
#: models and margin heads. They read files (images, weights with ``torch.load(weights_only=True)``)
#: and write none.
FILE_BUILDERS = (
    "fame.data.ClassificationDataModule",
    "fame.data.FaceRecognitionDataModule",
    "fame.data.FaceTrainingDataModule",
    "fame.data.VerificationDataModule",
    "fame.data.ShapesDataset",
    "fame.data.ShortcutShapesDataset",
    "fame.data.SyntheticFaces",
    "fame.data.SyntheticFacePairs",
    "fame.data.ImageFolderDataset",
    "fame.data.IdentityFolderDataset",
    "fame.data.ImageNetValidation",
    "fame.data.RecordIODataset",
    "fame.data.PairsDataset",
    "fame.data.PairsDataset.from_bin",
    "fame.data.PairsDataset.from_csv",
    "fame.data.PairsDataset.from_lfw_pairs",
    "fame.models.SmallCNN",
    "fame.models.build_classifier",
    "fame.models.finetune_classifier",
    "fame.models.build_face_model",
    "fame.models.ArcFaceHead",
    "fame.models.CosFaceHead",
    "fame.models.CombinedMarginHead",
    "fame.models.AdaFaceHead",
)
#: Hydra's own keys of a node with a ``_target_``: not arguments of the builder.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


@functools.lru_cache(maxsize=None)
def file_builders() -> Dict[str, Callable[..., Any]]:
    """:data:`FILE_BUILDERS` by every name that reaches them: the public one
    (``fame.models.SmallCNN``) and the defining module's (``fame.models.cnn.SmallCNN``)."""
    builders: Dict[str, Callable[..., Any]] = {}
    for name in FILE_BUILDERS:
        parts = name.split(".")  # fame.<package>.<name>[.<classmethod>]
        builder: Any = importlib.import_module(".".join(parts[:2]))
        for part in parts[2:]:
            builder = getattr(builder, part)
        builders[name] = builders[f"{builder.__module__}.{builder.__qualname__}"] = builder
    return builders


def config_targets(*nodes: Any) -> frozenset:
    """Every ``_target_`` named in config nodes (the user's command line and the repository's
    configs): a file may name these too."""
    found = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for node in nodes:
        walk(plain(node))
    return frozenset(found)


def trust_hint(path: Any) -> str:
    """How a user trusts a file of their own (the refusal messages end with it)."""
    return f"If you made {path} yourself, trust it: trust=[{path}] on the command line (trust=True in Python)"


def trusted_file(config: Any, path: Any) -> bool:
    """Whether the user named ``path`` in the config key ``trust`` (a path or a list of paths)."""
    value = lookup(config, "trust", default=None)
    entries = [value] if isinstance(value, (str, os.PathLike)) else value or []
    if not isinstance(entries, list) or not all(isinstance(entry, (str, os.PathLike)) for entry in entries):
        raise ConfigError(f"config key 'trust' has the value {value!r}; allowed: a list of paths of files you made "
                          "yourself (stores, checkpoints, sweep indexes), e.g. trust=[outputs/explain/maps.zarr]")
    wanted = Path(path).resolve()
    return any(Path(entry).resolve() == wanted for entry in entries)


def check_file_data(content: Any, path: Any, key: str, *, trusted: bool = False, named: Iterable[str] = ()) -> None:
    """Refuse what ``content``, read from the file ``path``, may not make the project do.

    Every ``_target_`` (at any depth, in lists too) must be one of :data:`FILE_BUILDERS` or a
    target in ``named`` (those the user's config names), and the arguments of a project builder
    must be parameters it takes; no string may hold an OmegaConf interpolation (``${...}``
    resolvers read the environment); no ``trust`` key may be set (a file cannot vouch for the
    files it names). ``key`` is the dotted path of ``content`` in the error messages. A file the
    user trusts (``trusted``) is not checked.

    Raises:
        UntrustedFileError: naming the file, the key, the value and how to trust the file.
        ConfigError: an argument a project builder does not take.
    """
    if trusted:
        return
    named = frozenset(named)
    builders = file_builders()

    def refuse(where: str, what: str) -> None:
        raise UntrustedFileError(f"{path} holds {where} = {what}; files are data, so nothing in it is built. "
                                 f"{trust_hint(path)}")

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "_target_" in node:
                target = node["_target_"]
                if not isinstance(target, str) or target not in builders and target not in named:
                    refuse(f"{where}._target_", f"{target!r}, which is not one of the project's builders (fame.config.FILE_BUILDERS)")
            for name, value in node.items():
                inner = f"{where}.{name}"
                if name == "trust" and value not in (None, False):
                    refuse(inner, f"{value!r}, which only the user can set")
                walk(value, inner)
            if node.get("_target_") in builders:
                check_arguments(builders[node["_target_"]], node, where, path)
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                walk(value, f"{where}.{index}")
        elif isinstance(node, str) and "${" in node:
            refuse(where, f"{node!r}, an interpolation")

    walk(plain(content), key)


def check_arguments(builder: Callable[..., Any], node: Mapping[str, Any], where: str, path: Any) -> None:
    """The keys of ``node`` (Hydra's own aside) are parameters of ``builder``."""
    parameters = inspect.signature(builder).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    unknown = [name for name in node if name not in HYDRA_KEYS and name not in parameters]
    if unknown:
        raise ConfigError(f"{path} holds {where} = {node['_target_']} with the argument(s) {unknown}, which it does "
                          f"not take (it takes {', '.join(parameters)})")
