"""What the entry points share: the console for the stages' messages, the one-line report of bad input
(exit status 2) and the check of command-line group choices before Hydra composes anything (README, Bad
input)."""

from __future__ import annotations

import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from .config import ConfigError
from .data.folder import count_classes
from .data.images import CorruptSampleError
from .store import StoreError, StoreMismatch

#: What an entry point reports as one line on stderr with exit status 2: a config value, a missing
#: file, a store that cannot serve this run (other settings, damaged maps, busy, an old layout), an
#: unreadable sample.
USER_ERRORS = (ConfigError, FileNotFoundError, StoreError, CorruptSampleError)
#: A config value left at ``???`` (OmegaConf's mandatory value) that the run needs.
MISSING_VALUES = (MissingMandatoryValue, InterpolationToMissingValueError)
#: Longest value shown for one differing key of a store.
SHOWN_VALUE = 80

# ``data.num_classes`` of configs/data/image_folder.yaml: the classes of the synsets file or of the folder.
OmegaConf.register_new_resolver("class_count", count_classes, replace=True)


def missing_value_line(error: Exception) -> str:
    """The one-line report of a mandatory config value (``???``) the run needs but was not given."""
    found = re.search(r"Missing mandatory value: (\S+)", str(error))
    key = found.group(1) if found else getattr(error, "full_key", "?")
    return f"config key {key!r} is missing (???); give it on the command line: {key}=..."


class ConsoleHandler(logging.StreamHandler):
    """Writes each record as its bare message: information on stdout, where the stages printed their
    lines; warnings and errors on stderr, where Python's last-resort handler writes them."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        super().emit(record)


def log_to_console(level: int = logging.INFO) -> None:
    """Show the ``fame`` loggers' records from ``level`` up on the console (:class:`ConsoleHandler`, once
    per process); the stages' loggers emit on global rank zero only (:mod:`fame.lightning.rank_zero`).
    The configs set ``hydra/job_logging: none``, so Hydra adds no handler of its own."""
    logger = logging.getLogger("fame")
    logger.setLevel(level)
    if not any(isinstance(handler, ConsoleHandler) for handler in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.propagate = False  # a handler another library puts on the root logger would repeat each line


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE else text[: SHOWN_VALUE - 3] + "..."


def error_line(error: BaseException) -> str:
    """The message of a user error on one line.

    A :class:`StoreMismatch` lists every differing key with the stored and the requested value; an
    error re-raised from a DataLoader worker (its message holds the worker's traceback) is the
    worker's own message; any other multi-line message is joined with spaces.
    """
    text = str(error).strip()
    if isinstance(error, StoreMismatch):
        lines = text.splitlines()
        keys = "; ".join(
            f"{key}: stored {_shown(stored)}, requested {_shown(requested)}"
            for key, stored, requested in error.differences
        )
        advice = " ".join(line.strip() for line in lines[1:] if line.strip() and not line.startswith("  "))
        return f"{lines[0].rstrip(':')}: {keys}. {advice}".strip()
    if "\nOriginal Traceback" in text:  # torch.utils.data's ExceptionWrapper.reraise
        last = text.splitlines()[-1]
        for name in (f"{type(error).__module__}.{type(error).__qualname__}: ", f"{type(error).__qualname__}: "):
            if last.startswith(name):
                return last[len(name) :]
        return last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextmanager
def one_line_errors(script: str, config: Optional[DictConfig] = None) -> Iterator[None]:
    """Report a user error (``USER_ERRORS``) as ``<script>: <one line>`` on stderr and exit with 2."""
    try:
        yield
    except MISSING_VALUES as error:
        print(f"{script}: {missing_value_line(error)}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as error:
        line = error_line(error)
        if isinstance(error, CorruptSampleError) and config is not None and config.data.get("skip_corrupt") is False:
            line += " (on the command line: data.skip_corrupt=true)"
        print(f"{script}: {line}", file=sys.stderr)
        sys.exit(2)


def check_group_choices(arguments: Sequence[str], config_dir: Path, script: str) -> None:
    """Refuse a command-line choice of a config group (``experiment=``, ``explainer=[...]``, ``data=``...)
    that names no file of that group, listing the known ones, before Hydra composes anything.

    Prints ``<script>: unknown <group> ...; known: ...`` on stderr and exits with 2.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    texts = [argument for argument in arguments if "=" in argument and not argument.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(texts)
    except HydraException:  # malformed overrides: Hydra's own message says what is wrong
        return
    for override in overrides:
        group = config_dir / override.key_or_group
        if override.is_delete() or override.package is not None or not group.is_dir():
            continue
        try:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except HydraException:  # glob() and other sweeps that need Hydra's config loader
            continue
        names = [name for value in values for name in (value if isinstance(value, list) else [value])]
        known = sorted(path.stem for path in group.glob("*.yaml"))
        unknown = [name for name in names if name is not None and str(name) not in known]
        if unknown:
            print(
                f"{script}: unknown {override.key_or_group} {', '.join(map(repr, unknown))}; known: {', '.join(known)}",
                file=sys.stderr,
            )
            sys.exit(2)
