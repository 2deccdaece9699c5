"""Submodules by dotted name, the same in pixel space and in the normalized input space."""

from __future__ import annotations

import difflib

from torch import nn


def _wraps_net(model: nn.Module) -> bool:
    """Whether ``model`` is a wrapper that normalizes inside and runs ``model.net`` (Classifier, FaceEmbedder)."""
    return hasattr(model, "normalize") and isinstance(getattr(model, "net", None), nn.Module)


def find_submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule of ``model`` with the dotted ``name``, whatever the input space.

    For a wrapper with ``normalize`` and ``net`` (the pixel-space model) and for its bare ``net``
    (``input_space=normalized``) alike, ``"net.layer4"`` and ``"layer4"`` name the same module. An
    unknown name is a ValueError listing the closest names.
    """
    candidates = [name]
    if _wraps_net(model) and not name.startswith("net."):
        candidates.append(f"net.{name}")
    if name.startswith("net.") and not isinstance(getattr(model, "net", None), nn.Module):
        candidates.append(name.removeprefix("net."))
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    names = [module_name for module_name, _ in model.named_modules() if module_name]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6) or difflib.get_close_matches(
        candidates[-1], names, n=5, cutoff=0.6
    )
    top_level = [child for child, _ in model.named_children()]
    hint = f"; close names: {', '.join(close)}" if close else f"; its top-level modules: {', '.join(top_level)}"
    raise ValueError(f"the model has no submodule named {name!r} ({type(model).__name__}){hint}")


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model`` (the first, if it is registered twice)."""
    return next((name for name, candidate in model.named_modules() if candidate is module), type(module).__name__)
