"""Reading checkpoint files safely and loading state_dicts strictly, with errors that say what to fix."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: How many key names an error message lists before summarising the rest.
LISTED_KEYS = 5


class UntrustedCheckpointError(RuntimeError):
    """The file holds pickled Python objects beyond tensors and containers (weights_only refused it)."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *, trust: bool = False) -> Any:
    """Read a ``torch.save`` file with ``torch.load(weights_only=True)``.

    Files that pickle arbitrary objects (e.g. a Lightning ``.ckpt`` whose hyper-parameters are an
    ``argparse.Namespace``) are refused with :class:`UntrustedCheckpointError`; pass ``trust=True``
    to unpickle them fully, which can execute code stored in the file -- only for files from a
    source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), str(error))
        raise UntrustedCheckpointError(
            f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses ({refused}). "
            "Unpickling them can run code stored in the file. If you trust the file's source, load it with "
            "trust=True (load_checkpoint, build_face_model and build_classifier all take it)."
        ) from error


def state_dict_in(content: Any, *, source: str, wrappers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state_dict in a loaded checkpoint: ``content`` itself, or ``content[w]`` for the first
    ``w`` in ``wrappers`` that it holds (e.g. ``"state_dict"`` of Lightning, ``"model"`` of the
    torchvision reference scripts)."""
    if isinstance(content, Mapping):
        for wrapper in wrappers:
            if isinstance(content.get(wrapper), Mapping):
                content = content[wrapper]
                break
    if not isinstance(content, Mapping) or not all(isinstance(key, str) for key in content):
        inside = f" (or a dict holding one under {', '.join(map(repr, wrappers))})" if wrappers else ""
        raise TypeError(
            f"{source}: expected a state_dict, a mapping of parameter names to tensors{inside}; "
            f"got {type(content).__name__}. Save model.state_dict(), not the model object."
        )
    return dict(content)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` (e.g. ``"module."`` left by DataParallel/DDP) from every key that has it."""
    return {(key[len(prefix) :] if key.startswith(prefix) else key): value for key, value in state_dict.items()}


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    more = len(keys) - LISTED_KEYS
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def load_state_dict_strictly(
    module: nn.Module, state_dict: Mapping[str, Any], *, source: str, expected: str, hint: str = ""
) -> None:
    """Load every key of ``module`` from ``state_dict`` with matching shapes, or raise one clear error.

    ``source`` names the file, ``expected`` the architecture the file should hold and ``hint`` is
    appended to the error (e.g. which architecture the keys look like). Missing ``num_batches_tracked``
    counters are tolerated, as ``torch`` does for older files; everything else must match exactly.
    """
    own = module.state_dict()
    missing = [key for key in own if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in own]
    wrong_shapes = [
        f"{key} (expected {tuple(own[key].shape)}, file has {tuple(state_dict[key].shape)})"
        for key in own
        if key in state_dict and isinstance(state_dict[key], torch.Tensor) and state_dict[key].shape != own[key].shape
    ]
    not_tensors = [key for key in own if key in state_dict and not isinstance(state_dict[key], torch.Tensor)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if wrong_shapes:
        problems.append(f"{len(wrong_shapes)} shape mismatch(es): {_listed(wrong_shapes)}")
    if not_tensors:
        problems.append(f"{len(not_tensors)} value(s) that are not tensors: {_listed(not_tensors)}")
    if problems:
        message = f"{source} does not match {expected}: " + "; ".join(problems) + "."
        raise ValueError(f"{message} {hint}".strip())
    module.load_state_dict(dict(state_dict), strict=False)
