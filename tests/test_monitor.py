"""The explanation monitor under fit and validate: outputs, loggers, resume, and no effect on training."""

import json
import math
import random
import struct
import time

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.seed import isolate_rng

from fame.data import ShortcutShapesDataset, SyntheticFacePairs, SyntheticFaces, VerificationDataModule
from fame.data.modules import ClassificationDataModule
from fame.lightning.classifier import ImageClassifier
from fame.lightning.monitor import ExplanationMonitor, rank_correlation

FAME = {"iterations": 3, "blur_kernel": 7, "blur_sigma": 1.0}
SCALARS = (
    "monitor/fame/relevance_mass/watermark",
    "monitor/fame/pointing_game/object",
    "monitor/fame/deletion_auc",
    "monitor/gradcam/relevance_mass/watermark",
)


def shortcut_data() -> ClassificationDataModule:
    return ClassificationDataModule(
        train=ShortcutShapesDataset(32, image_size=32, seed=1, strength=0.9),
        val=ShortcutShapesDataset(8, image_size=32, seed=2, strength=0.0),
        batch_size=16,
        seed=0,
    )


def classifier() -> ImageClassifier:
    L.seed_everything(0)
    return ImageClassifier(model={"_target_": "fame.models.SmallCNN", "num_classes": 4, "widths": [4, 8, 8, 8]})


def monitor(**options) -> ExplanationMonitor:
    return ExplanationMonitor(**{"num_probes": 3, "every_n_epochs": 1, "fame": FAME, **options})


def trainer(root, callbacks, logger=None, **options) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        default_root_dir=root,
        callbacks=callbacks,
        logger=CSVLogger(root, name="csv") if logger is None else logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    return L.Trainer(**{**settings, **options})


def test_fit_checks_every_epoch_but_not_the_sanity_pass_and_logs_csv_and_png(tmp_path):
    callback = monitor()
    run = trainer(tmp_path, [callback], num_sanity_val_steps=1)
    run.fit(classifier(), datamodule=shortcut_data())
    assert [(record["epoch"], record["step"]) for record in callback.history] == [(0, 2), (1, 4)]
    assert sorted(p.name for p in (tmp_path / "csv" / "version_0" / "monitor").iterdir()) == [
        "epoch_000.png",
        "epoch_001.png",
    ]
    logged = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    for name in SCALARS + ("monitor/fame/stability", "monitor/seconds"):
        assert name in logged.columns, name
    rows = logged.dropna(subset=["monitor/fame/relevance_mass/watermark"])
    assert rows["step"].tolist() == [2, 4] and rows["epoch"].tolist() == [0, 1]
    assert rows["monitor/fame/stability"].isna().tolist() == [True, False]
    for name in SCALARS:
        assert rows[name].between(0, 1).all(), name
    first = callback.history[0]
    assert sorted(first["explained"]) == [["shortcut-2-0", 0], ["shortcut-2-4", 0], ["shortcut-2-7", 0]]
    assert set(callback.previous_maps) == {"fame", "gradcam"}
    assert all(m.shape == (32, 32) for m in callback.previous_maps["fame"].values())


def test_every_n_epochs_and_the_final_check_at_the_end_of_fit(tmp_path):
    callback = monitor(every_n_epochs=2, baseline=None)
    trainer(tmp_path, [callback], max_epochs=3, num_sanity_val_steps=0).fit(classifier(), datamodule=shortcut_data())
    assert [(record["epoch"], record["step"]) for record in callback.history] == [(1, 4), (2, 6)]
    assert all(not name.startswith("monitor/gradcam") for name in callback.history[0]["metrics"])


class GradientsBeforeTheMonitor(L.Callback):
    """Gives the network gradients and a frozen first stage right before the monitor's check
    (Lightning clears gradients when validation starts)."""

    def on_validation_epoch_end(self, trainer, pl_module):
        for parameter in pl_module.model.parameters():
            parameter.grad = torch.full_like(parameter, 0.5)
        pl_module.model.stages[0].requires_grad_(False)
        self.inference_mode = torch.is_inference_mode_enabled()


def test_validate_runs_under_inference_mode_and_leaves_the_model_as_found(tmp_path):
    module = classifier()
    network = module.model
    before = {key: value.clone() for key, value in network.state_dict().items()}
    gradients, callback = GradientsBeforeTheMonitor(), monitor(probe_ids=["shortcut-2-5", "shortcut-2-1"])
    run = trainer(tmp_path, [gradients, callback])
    run.validate(module, datamodule=shortcut_data(), verbose=False)
    assert gradients.inference_mode
    assert [record["epoch"] for record in callback.history] == [0]
    assert [sample_id for sample_id, _ in callback.history[0]["explained"]] == ["shortcut-2-5", "shortcut-2-1"]
    assert (tmp_path / "csv" / "version_0" / "monitor" / "epoch_000.png").stat().st_size > 0
    assert all(torch.equal(before[key], value) for key, value in network.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in network.parameters())
    assert [p.requires_grad for p in network.parameters()] == [
        not name.startswith("stages.0") for name, _ in network.named_parameters()
    ]
    assert all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in network.modules())
    # a validate at the same step as the last check adds nothing
    run.validate(module, datamodule=shortcut_data(), verbose=False)
    assert len(callback.history) == 1


def test_training_is_the_same_with_and_without_the_monitor(tmp_path):
    weights = []
    for callbacks in ([], [monitor()]):
        module = classifier()
        trainer(tmp_path, callbacks, max_epochs=2).fit(module, datamodule=shortcut_data())
        weights.append(module.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_random_states_are_restored():
    """The monitor's checks run inside Lightning's isolate_rng, as ExplanationMonitor.check enters it."""
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with isolate_rng(include_cuda=torch.cuda.is_initialized()):
        torch.rand(5), np.random.rand(5), random.random()
    drawn = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


def test_resume_restores_the_history_and_the_stability_reference(tmp_path):
    uninterrupted = monitor()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, [uninterrupted, checkpoints], enable_checkpointing=True).fit(
        classifier(), datamodule=shortcut_data()
    )
    state = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)["callbacks"]
    assert [key for key in state if key.startswith("ExplanationMonitor")]
    resumed = monitor()
    trainer(tmp_path, [resumed]).fit(
        classifier(), datamodule=shortcut_data(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt")
    )
    assert resumed.history[0] == uninterrupted.history[0]
    assert [record["epoch"] for record in resumed.history] == [0, 1]
    assert "monitor/fame/stability" in resumed.history[1]["metrics"]  # compared with the restored maps


def wandb_records(run_file):
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records: a 7-byte
    file header, 32 KiB blocks, chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    raw, position, pending, records = run_file.read_bytes(), 7, b"", []
    while position + 7 <= len(raw):
        room = 32768 - position % 32768
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_dir, wait_seconds=120.0):
    """History rows of the offline run in ``run_dir``, once the W&B service has written the run's
    exit record (it writes the file on its own after ``wandb.finish()`` returns)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        records = wandb_records(next(run_dir.glob("run-*.wandb")))
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_holds_the_grid_and_the_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="fame-monitor-test", save_dir=str(tmp_path), offline=True)
    run = trainer(tmp_path, [monitor(baseline=None)], logger=[logger, CSVLogger(tmp_path, name="csv")], max_epochs=1)
    run.fit(classifier(), datamodule=shortcut_data())
    wandb.finish()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    (image,) = (run_dir / "files" / "media" / "images" / "monitor").glob("overlays_*.png")
    (scalars,) = [row for row in rows if "monitor/fame/relevance_mass/watermark" in row]
    assert 0 <= scalars["monitor/fame/relevance_mass/watermark"] <= 1 and scalars["trainer/global_step"] == 2
    (images,) = [row for row in rows if "monitor/overlays/filenames" in row]
    assert images["monitor/overlays/filenames"] == [str(image.relative_to(run_dir / "files"))]
    assert images["monitor/overlays/captions"] == ["epoch 0"]
    assert (tmp_path / "csv" / "version_0" / "monitor" / "epoch_000.png").exists()


def test_face_pairs_are_explained_through_the_embedder(tmp_path):
    from fame.lightning.face import FaceRecognizer

    faces = SyntheticFaces(num_identities=3, images_per_identity=2, size=64, seed=0)
    pairs = VerificationDataModule(SyntheticFacePairs(faces, num_pairs=6, seed=0), batch_size=6)
    L.seed_everything(0)
    module = FaceRecognizer(
        backbone={"arch": "small", "input_size": 64},
        head=None,
        num_classes=3,
        embedding_size=32,
        val_sets=["synthetic"],
        folds=2,
    )
    callback = monitor(num_probes=2, fame={"iterations": 3, "blur_kernel": 9, "blur_sigma": 1.5})
    trainer(tmp_path, [callback]).validate(module, datamodule=pairs, verbose=False)
    metrics = callback.history[0]["metrics"]
    assert {
        "monitor/fame/similarity_drop",
        "monitor/fame/relevance_mass/identity",
        "monitor/gradcam/pointing_game/identity",
    } <= set(metrics)
    assert all(math.isfinite(value) for value in metrics.values())
    assert [sample_id for sample_id, _ in callback.history[0]["explained"]] == ["synpair-0-0-0", "synpair-0-0-5"]


def test_rank_correlation():
    grid = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert rank_correlation(grid, grid**2) == pytest.approx(1.0)
    assert rank_correlation(grid, -grid) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(grid, np.zeros_like(grid)))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="baseline"):
        ExplanationMonitor(baseline="no-such-method")
    with pytest.raises(ValueError, match="every_n_epochs"):
        ExplanationMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="target"):
        ExplanationMonitor(target="predicted")
