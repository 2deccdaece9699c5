"""What produced a set of maps: the checkpoint's digest, the code's version and the machine."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Union

import torch


def checkpoint_digest(path: Union[str, Path], block_size: int = 1 << 20) -> str:
    """SHA-256 (hex) of the file at ``path``: the identity of a checkpoint, whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _git(directory: Path, *arguments: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", "-C", str(directory), *arguments], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state(directory: Union[str, Path, None] = None) -> Dict[str, object]:
    """``{"commit": HEAD or None, "dirty": True if tracked files differ from HEAD}`` of the
    repository holding ``directory`` (default: this package's source); both None outside a repository."""
    directory = Path(directory) if directory is not None else Path(__file__).resolve().parent
    commit = _git(directory, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    changes = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(changes) if changes is not None else None}


def package_version(name: str) -> Optional[str]:
    """Installed version of distribution ``name``, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> Dict[str, object]:
    """The software and hardware a run used: package and library versions, git commit, CUDA and GPUs."""
    from . import __version__

    cuda = torch.cuda.is_available()
    return {
        "fame": __version__,
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "torch": torch.__version__,
        "lightning": package_version("lightning"),
        "zarr": package_version("zarr"),
        "numpy": package_version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if cuda else [],
    }
