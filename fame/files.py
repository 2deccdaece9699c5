"""Files are data: what the project may build from a file it reads.

A ``_target_`` found in a file (a store's data config, a checkpoint's hyper-parameters) is built
only when it names one of the project's own builders (:data:`FILE_BUILDERS`) or a target the
user's own config names, unless the user trusts that file (``trust=[PATH]``); see
:func:`check_file_data` and the README's "Files are data". This module sits below the config
mechanism (:mod:`fame.config`) and the Lightning adapters, which both use it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Any, Callable, Dict, Iterable, Mapping

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


#: What a file may ask the project to build: its own datasets, data modules, classifiers, face
#: models and margin heads, and the optimizers and learning-rate schedules of its Lightning modules.
#: They read files (images, weights with ``torch.load(weights_only=True)``) and write none.
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
    "torch.optim.SGD",
    "torch.optim.AdamW",
    "torch.optim.lr_scheduler.StepLR",
    "fame.lightning.schedules.one_cycle",
    "fame.lightning.schedules.cosine",
    "fame.lightning.schedules.polynomial",
    "fame.lightning.schedules.step_decay",
)
#: Hydra's own keys of a node with a ``_target_``: not arguments of the builder.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


@functools.cache
def file_builders() -> Dict[str, Callable[..., Any]]:
    """:data:`FILE_BUILDERS` by every name that reaches them: the public one
    (``fame.models.SmallCNN``) and the defining module's (``fame.models.cnn.SmallCNN``)."""
    builders: Dict[str, Callable[..., Any]] = {}
    for name in FILE_BUILDERS:
        parts = name.split(".")  # <package>.<module>...<name>[.<classmethod>]
        depth = next(
            depth
            for depth in range(len(parts) - 1, 0, -1)
            if importlib.util.find_spec(".".join(parts[:depth])) is not None
        )
        builder: Any = importlib.import_module(".".join(parts[:depth]))
        for part in parts[depth:]:
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
        raise UntrustedFileError(
            f"{path} holds {where} = {what}; files are data, so nothing in it is built. {trust_hint(path)}"
        )

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "_target_" in node:
                target = node["_target_"]
                if not isinstance(target, str) or target not in builders and target not in named:
                    refuse(
                        f"{where}._target_",
                        f"{target!r}, which is not one of the project's builders (fame.config.FILE_BUILDERS)",
                    )
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
        raise ConfigError(
            f"{path} holds {where} = {node['_target_']} with the argument(s) {unknown}, which it does "
            f"not take (it takes {', '.join(parameters)})"
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
        raise ConfigError(
            f"{key} must be a mapping with a _target_ naming the class or function to build, got {node!r}"
        )
    try:
        return hydra_instantiate(node, **extra, _convert_="all")
    except InstantiationException as error:
        raise ConfigError(f"could not build {key} ({node['_target_']}): {error}") from error
