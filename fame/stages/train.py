"""train.py: fit the model of a config, in a run folder of its own, resuming only its own unfinished run."""

from __future__ import annotations

import pickletools
import shutil
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import lightning as L
import yaml
from hydra.utils import get_class
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from ..config import ConfigError, config_digest, config_targets, instantiate, plain, trusted_file
from ..lightning.checkpoints import check_module_checkpoint
from ..lightning.rank_zero import rank_zero_logger
from ..lightning.resume import ExactResume
from ..pipeline import build_datamodule, build_logger, finish_wandb
from ..schemas import TrainConfig, check
from ..viz import save_monitor_curves

log = rank_zero_logger(__name__)

FINISHED = "FINISHED"
#: Keys that do not change what is trained: a run that differs only in these resumes the same folder.
NOT_TRAINING = (
    "paths",
    "experiment_name",
    "logger",
    "resume",
    "trust",
    "run_root",
    "run_dir",
    "checkpoint",
    "callbacks",
    "explainer",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)


def check_train_config(config: DictConfig) -> None:
    """Validate the training config before anything is built (:class:`fame.schemas.TrainConfig`;
    errors name the key and the allowed values), and a ``resume=`` file."""
    check(TrainConfig, config)
    if isinstance(config.resume, str) and config.resume != "auto":
        check_resume_checkpoint(Path(config.resume))


#: What a Lightning checkpoint needs to resume training (a weights-only one has the state_dict only).
RESUME_KEYS = ("state_dict", "optimizer_states", "loops")


def check_resume_checkpoint(path: Path) -> None:
    """Refuse a ``resume=`` file that is not a complete training checkpoint, before a run folder is
    written next to it: it must be an intact torch zip archive (every member's CRC checked) whose
    pickle names ``RESUME_KEYS``. The pickle is only scanned for its strings, never unpickled."""
    if not path.is_file():
        raise ConfigError(f"resume={str(path)!r}: no such checkpoint file")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            strings = set()
            if pickles and damaged is None:
                strings = {
                    argument
                    for _, argument, _ in pickletools.genops(archive.read(pickles[0]))
                    if isinstance(argument, str)
                }
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ConfigError(
            f"resume={str(path)!r} is not a readable checkpoint ({error}; a torch checkpoint is a zip "
            "archive): pass the last.ckpt of an unfinished run, or resume=auto"
        ) from error
    if damaged is not None:
        raise ConfigError(
            f"resume={str(path)!r} is damaged (member {damaged} fails its CRC check): pass another "
            "checkpoint of the run, or resume=auto"
        )
    missing = [key for key in RESUME_KEYS if key not in strings]
    if missing:
        raise ConfigError(
            f"resume={str(path)!r} cannot resume training: it lacks {missing} (a weights-only model.ckpt "
            "or not a Lightning checkpoint); pass the last.ckpt of an unfinished run, or resume=auto"
        )


def check_training_data(datamodule) -> None:
    """Set up the training data before any run folder exists, so that a data folder that is missing or
    empty, or a training split smaller than one batch, is a ConfigError and not a failure inside fit."""
    try:
        datamodule.setup("fit")
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"data.datamodule: {error}") from error


def training_digest(config: DictConfig) -> str:
    """Hash of what decides the trained weights (everything but NOT_TRAINING)."""
    values = plain(config)
    for key in NOT_TRAINING:
        node, _, leaf = key.rpartition(".")
        parent = values
        for part in filter(None, node.split(".")):
            parent = parent.get(part, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict):
            parent.pop(leaf, None)
    return config_digest(values)


def choose_run(config: DictConfig) -> Tuple[Path, Optional[str]]:
    """(run folder, checkpoint to resume or None) following ``config.resume``.

    ``auto``: the newest unfinished run of this same configuration continues from its
    ``last.ckpt``; a finished run (or none) means a fresh folder ``<digest>[-n]``. ``false``:
    always a fresh folder. A path: resume that checkpoint, in its own folder.
    """
    root = Path(config.run_root)
    digest = training_digest(config)
    if config.resume not in ("auto", False):
        checkpoint = Path(config.resume)
        return checkpoint.parent, str(checkpoint)
    runs = sorted(root.glob(f"{digest}*"), key=lambda p: (len(p.name), p.name))
    runs = [p for p in runs if p.name == digest or p.name.startswith(f"{digest}-")]
    if config.resume == "auto" and runs and not (runs[-1] / FINISHED).exists():
        return runs[-1], readable_checkpoint(runs[-1])
    name = digest if not runs else f"{digest}-{len(runs) + 1}"
    return root / name, None


def readable_checkpoint(run_dir: Path) -> Optional[str]:
    """The run's newest complete checkpoint: ``last.ckpt`` normally; a ``last-v<n>.ckpt`` that a
    rerun with other checkpoint settings wrote beside it; or the newest other checkpoint when a
    kill truncated the newest one mid-write (torch.save files are zip archives: a truncated one
    has no central directory)."""
    candidates = sorted(
        (p for p in run_dir.glob("*.ckpt") if p.name != "model.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True
    )
    for candidate in candidates:
        try:
            zipfile.ZipFile(candidate).close()
            return str(candidate)
        except zipfile.BadZipFile:
            log.info(f"skipping the unreadable checkpoint {candidate} (a kill interrupted its writing)")
    return None


def build_callbacks(config: DictConfig):
    """The configured callbacks, then :class:`~fame.lightning.resume.ExactResume` (last, so it
    restores the random states after every other callback's ``on_train_start``)."""
    callbacks = []
    for name, spec in (config.get("callbacks") or {}).items():
        if spec is not None:
            callbacks.append(instantiate(spec, f"callbacks.{name}"))
    return callbacks + [ExactResume()]


def train(config: DictConfig) -> Dict[str, float]:
    """Train ``config.module`` on ``config.data``; write the run folder and the final checkpoint.

    A resumed run ends exactly where the uninterrupted one would: the checkpoint restores the
    weights, optimizer, schedule, loop counters, callback states, the random generators
    and the training loader's epoch and position (:class:`~fame.lightning.resume.ExactResume`,
    :class:`~fame.data.modules.ResumableLoader`: data order from the seed and the epoch, flips
    keyed by sample id). Mid-epoch checkpoints (``callbacks.resume.every_n_train_steps``) resume
    after the batches already trained on. Returns the final validation metrics.
    """
    check_train_config(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config)
    check_training_data(datamodule)
    run_dir, resume = choose_run(config)
    trusted = bool(resume) and trusted_file(config, resume)
    if resume:  # a checkpoint is data: of this module, naming only known targets, before anything is written
        check_module_checkpoint(
            get_class(config.module._target_),
            resume,
            trust=trusted,
            named_targets=config_targets(config.module, config.model),
        )
    with open_dict(config):
        config.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
    if resume:
        log.info(f"resuming the unfinished run {run_dir} from {resume}")
    else:
        log.info(f"training in {run_dir}")

    if config.data.get("num_classes", 0) is None:  # read from the data (e.g. a RecordIO header)
        with open_dict(config):
            config.data.num_classes = int(datamodule.num_classes)
    module = instantiate(config.module, "module")
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="csv")]  # the run folder's log (monitor curves)
    wandb = build_logger(config, "train")
    if wandb is not None:
        loggers.append(wandb)
    trainer = instantiate(
        config.trainer, "trainer", logger=loggers, callbacks=build_callbacks(config), default_root_dir=str(run_dir)
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=not trusted)
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    trainer.save_checkpoint(run_dir / "model.ckpt", weights_only=True)  # every rank: it may be a collective
    if trainer.is_global_zero:
        if config.checkpoint is not None:  # null (e.g. experiment=imagenet): the run folder's model.ckpt only
            checkpoint = Path(config.checkpoint)
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "model.ckpt", checkpoint)
        (run_dir / "metrics.yaml").write_text(yaml.safe_dump(metrics))
        curves = save_monitor_curves(run_dir / "csv" / "metrics.csv", run_dir / "monitor_curves.png")
        if curves is not None:
            log.info(f"explanation monitor curves: {curves}")
        (run_dir / FINISHED).write_text("")
    finish_wandb(wandb)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val/"))
    log.info(f"{summary}; checkpoint written to {config.checkpoint or run_dir / 'model.ckpt'} (run folder {run_dir})")
    return metrics
