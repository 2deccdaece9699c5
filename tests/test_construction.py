"""One construction mechanism: trainer, loggers, optimizer and schedule from `_target_` nodes; checkpoints of the
layout before optimizer and scheduler were nodes still load; the Lightning adapters sit below the config layer."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from fame.config import ConfigError, instantiate
from fame.files import file_builders
from fame.lightning import FaceRecognizer, ImageClassifier
from fame.pipeline import build_logger
from fame.stages.train import check_train_config

ROOT = Path(__file__).resolve().parents[1]
SMALL_CNN = {"_target_": "fame.models.SmallCNN", "num_classes": 4, "widths": [4, 8, 8, 8]}
SMALL_FACE = {"arch": "small", "input_size": 32}


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("train", overrides=list(overrides))


def old_layout_checkpoint(module, path, **hyperparameters):
    """A weights-only checkpoint whose hyper-parameters name the optimizer and schedule by string, as train.py wrote
    them before configs/module/optimizer/ and configs/module/scheduler/ existed."""
    kept = {key: value for key, value in module.hparams.items() if key not in ("optimizer", "scheduler")}
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": {**kept, **hyperparameters},
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def fit_two_steps(module, batches):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def test_a_classifier_checkpoint_of_the_old_layout_loads_and_trains_with_its_optimizer(tmp_path):
    path = old_layout_checkpoint(
        ImageClassifier(model=SMALL_CNN),
        tmp_path / "old.ckpt",
        optimizer="sgd",
        lr=0.01,
        weight_decay=1e-4,
        momentum=0.8,
        nesterov=True,
        schedule="step",
        warmup_fraction=0.3,
        step_epochs=3,
        gamma=0.5,
    )
    module = ImageClassifier.load_from_checkpoint(path)
    assert module.hparams.optimizer == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.01,
        "weight_decay": 1e-4,
        "momentum": 0.8,
        "nesterov": True,
    }
    assert module.hparams.scheduler == {
        "_target_": "fame.lightning.schedules.step_decay",
        "_partial_": True,
        "step_epochs": 3,
        "gamma": 0.5,
    }
    batches = [{"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1])}] * 2
    trainer = fit_two_steps(module, batches)
    optimizer, (schedule,) = trainer.optimizers[0], trainer.lr_scheduler_configs
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"] is True
    assert isinstance(schedule.scheduler, torch.optim.lr_scheduler.StepLR) and schedule.interval == "epoch"
    assert schedule.scheduler.step_size == 3 and schedule.scheduler.gamma == 0.5


def test_a_face_checkpoint_of_the_old_layout_loads_with_a_constant_or_polynomial_schedule(tmp_path):
    module = FaceRecognizer(backbone=SMALL_FACE, head=None, num_classes=3, embedding_size=16)
    old = {"optimizer": "adamw", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "power": 1.0, "warmup_steps": 2}
    constant = FaceRecognizer.load_from_checkpoint(
        old_layout_checkpoint(module, tmp_path / "constant.ckpt", **old, schedule="constant")
    )
    assert constant.hparams.optimizer == {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "lr": 0.05,
        "weight_decay": 5e-4,
    }
    assert constant.hparams.scheduler is None
    polynomial = FaceRecognizer.load_from_checkpoint(
        old_layout_checkpoint(module, tmp_path / "polynomial.ckpt", **old, schedule="polynomial")
    )
    assert polynomial.hparams.scheduler == {
        "_target_": "fame.lightning.schedules.polynomial",
        "_partial_": True,
        "power": 1.0,
        "warmup_steps": 2,
    }


def test_the_optimizer_and_schedule_builders_are_file_builders():
    builders = file_builders()
    assert builders["torch.optim.SGD"] is torch.optim.SGD and builders["torch.optim.AdamW"] is torch.optim.AdamW
    for name in ("one_cycle", "cosine", "polynomial", "step_decay"):
        assert callable(builders[f"fame.lightning.schedules.{name}"])


def test_the_classifier_schedules_of_the_config_groups_step_as_configured():
    expected = {
        "onecycle": torch.optim.lr_scheduler.OneCycleLR,
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
        "step": torch.optim.lr_scheduler.StepLR,
    }
    batches = [{"image": torch.rand(2, 3, 32, 32), "label": torch.tensor([0, 1])}] * 2
    for name, kind in expected.items():
        config = compose_train(f"module/scheduler={name}", "module/optimizer=sgd")
        module = ImageClassifier(
            model=SMALL_CNN, optimizer=dict(config.module.optimizer), scheduler=dict(config.module.scheduler)
        )
        trainer = fit_two_steps(module, batches)
        assert isinstance(trainer.lr_scheduler_configs[0].scheduler, kind)
        assert trainer.optimizers[0].defaults["lr"] == 0.003 and trainer.optimizers[0].defaults["momentum"] == 0.9
    module = ImageClassifier(model=SMALL_CNN, scheduler=None)
    trainer = fit_two_steps(module, batches)
    assert trainer.lr_scheduler_configs == [] and isinstance(trainer.optimizers[0], torch.optim.AdamW)


def test_the_trainer_and_the_loggers_are_built_from_their_target(tmp_path):
    config = compose_train(f"paths.output_dir={tmp_path}", "trainer.enable_progress_bar=false")
    trainer = instantiate(config.trainer, "trainer", logger=False, default_root_dir=str(tmp_path))
    assert isinstance(trainer, L.Trainer) and trainer.max_epochs == config.trainer.max_epochs
    csv = build_logger(compose_train(f"paths.output_dir={tmp_path}", "logger=csv"), "train")
    assert isinstance(csv, CSVLogger) and csv.name == "train" and Path(csv.save_dir) == tmp_path / "shapes" / "logs"
    assert build_logger(compose_train("logger=none"), "train") is None
    assert build_logger(compose_train("logger.enabled=false"), "train") is None


def test_a_string_for_an_optimizer_node_is_a_one_line_error():
    with pytest.raises(ConfigError) as refused:
        check_train_config(compose_train("module.optimizer=adam"))
    assert str(refused.value) == (
        "config key 'module.optimizer' has the value 'adam'; allowed: a config node with a "
        "_target_, e.g. module/optimizer=sgd or adamw (configs/module/optimizer/)"
    )
    with pytest.raises(ValueError, match="optimizer must be one of the specs of configs/module/optimizer/"):
        ImageClassifier(model=SMALL_CNN, optimizer="adam")


def test_the_lightning_adapters_import_neither_the_config_nor_the_stages():
    code = (
        "import sys, fame.lightning; print(sorted(m for m in sys.modules if m.startswith(('fame.config', "
        "'fame.stages', 'fame.schemas'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_finishing_a_run_closes_wandb_only(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from fame.pipeline import finish_wandb

    csv = CSVLogger(str(tmp_path))
    csv.log_metrics({"loss": 1.0})
    finish_wandb(csv)  # a CSV logger has no run to finish: train.py logger=csv ended with an AttributeError
    finish_wandb(None)
    csv.save()
    assert (Path(csv.log_dir) / "metrics.csv").is_file()
