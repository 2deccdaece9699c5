"""Lightning checkpoints are data: read with ``torch.load(weights_only=True)``, and what their
hyper-parameters name checked by :func:`fame.files.check_file_data` before a module is built.

``ImageClassifier.load_from_checkpoint`` and ``FaceRecognizer.load_from_checkpoint`` go through
:func:`load_module_checkpoint`; ``trust=True`` (``trust=[PATH]`` on the command line) unpickles the
file fully and builds whatever it names, for files the user made.
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import lightning as L
import torch

from ..files import ConfigError, UntrustedFileError, check_file_data, trust_hint

HYPER_PARAMETERS = "hyper_parameters"


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Tuple[bytes, Dict[str, Any]]:
    """(the bytes, the content) of a ``torch.save`` file holding a dict, read with
    ``weights_only=True`` (fully unpickled with ``trust``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    raw = path.read_bytes()
    try:
        content = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        refused = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), None)
        if refused is None:
            raise ConfigError(f"{path} is not a readable checkpoint ({str(error).splitlines()[0]})") from None
        raise UntrustedFileError(
            f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses "
            f"({refused}); unpickling them can run code stored in the file. {trust_hint(path)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise ConfigError(
            f"{path} is not a readable checkpoint, truncated or of another format ({str(error).splitlines()[0]})"
        ) from None
    if not isinstance(content, dict):
        raise ConfigError(
            f"{path} holds a {type(content).__name__}, not a Lightning checkpoint (a dict with "
            f"'state_dict' and '{HYPER_PARAMETERS}')"
        )
    return raw, content


def describe_hyperparameters(hyperparameters: Mapping[str, Any]) -> str:
    """What a checkpoint holds, in words, from its hyper-parameters (for mismatch errors)."""

    def named(spec: Any, *keys: str) -> str:
        spec = spec if isinstance(spec, Mapping) else {}
        return next(
            (
                spec[key] if key == "_target_" else f"{key} {spec[key]}"
                for key in ("_target_", *keys)
                if isinstance(spec.get(key), str)
            ),
            "?",
        )

    if "backbone" in hyperparameters:
        head = hyperparameters.get("head")
        return (
            f"a FaceRecognizer (face recognition; backbone {named(hyperparameters['backbone'], 'arch')}, "
            f"head {named(head, 'name') if head else 'name arcface'}, "
            f"{hyperparameters.get('num_classes', '?')} identities)"
        )
    if "model" in hyperparameters:
        return f"an ImageClassifier (classification; model {named(hyperparameters['model'], 'name')})"
    if not hyperparameters:
        return "no hyper-parameters (not a checkpoint that train.py wrote)"
    return f"a module with the hyper-parameters {sorted(hyperparameters)}"


def required_hyperparameters(module_class: type) -> list:
    """The arguments of ``module_class.__init__`` without a default."""
    parameters = list(inspect.signature(module_class.__init__).parameters.values())[1:]
    return [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def check_module_checkpoint(
    module_class: type,
    path: str | os.PathLike,
    *,
    trust: bool = False,
    named_targets: Iterable[str] = (),
    overrides: Optional[Mapping[str, Any]] = None,
) -> Tuple[bytes, Dict[str, Any]]:
    """Read ``path`` and check that ``module_class`` may be built from it.

    The checkpoint must hold the hyper-parameters ``module_class`` needs (else a one-line error
    says what it holds), and what they name must pass :func:`fame.files.check_file_data`
    (``named_targets``: targets the user's own config names). ``overrides`` replace
    hyper-parameters and are not checked (the caller gives them). A class may derive replacements
    from the file's hyper-parameters with a ``hyperparameters_from_checkpoint`` static method (these
    are checked). Returns (the file's bytes, the derived replacements).
    """
    raw, content = read_checkpoint(path, trust=trust)
    hyperparameters = content.get(HYPER_PARAMETERS)
    hyperparameters = dict(hyperparameters) if isinstance(hyperparameters, Mapping) else {}
    overrides = dict(overrides or {})
    missing = [name for name in required_hyperparameters(module_class) if name not in {**hyperparameters, **overrides}]
    if missing:
        raise ConfigError(
            f"{path} holds {describe_hyperparameters(hyperparameters)}, but the module to load is "
            f"{module_class.__module__}.{module_class.__qualname__}, which needs {', '.join(missing)}: give "
            "a checkpoint of this module, or the experiment= (module=) the checkpoint was trained with"
        )
    derive = getattr(module_class, "hyperparameters_from_checkpoint", None)
    derived = {
        name: value for name, value in (derive(hyperparameters) if derive else {}).items() if name not in overrides
    }
    built = {name: value for name, value in {**hyperparameters, **derived}.items() if name not in overrides}
    check_file_data(built, path, HYPER_PARAMETERS, trusted=trust, named=named_targets)
    return raw, derived


def load_module_checkpoint(
    module_class: type,
    path: str | os.PathLike,
    *,
    trust: bool = False,
    named_targets: Iterable[str] = (),
    map_location: Any = "cpu",
    strict: Optional[bool] = None,
    **overrides: Any,
) -> L.LightningModule:
    """A ``module_class`` from a Lightning checkpoint: checked by :func:`check_module_checkpoint`,
    then built by Lightning from the bytes that were checked, ``weights_only`` unless ``trust``.
    ``overrides`` replace hyper-parameters (as in Lightning's ``load_from_checkpoint``)."""
    raw, derived = check_module_checkpoint(
        module_class, path, trust=trust, named_targets=named_targets, overrides=overrides
    )
    # Lightning's own loader bound to module_class (the project's modules override load_from_checkpoint with a
    # call of this function)
    load = L.LightningModule.__dict__["load_from_checkpoint"].__get__(None, module_class)
    return load(
        io.BytesIO(raw), map_location=map_location, strict=strict, weights_only=not trust, **{**derived, **overrides}
    )
