"""FaceTrainingDataModule / VerificationDataModule over SyntheticFaces and plain tuple datasets."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fame.data import FaceTrainingDataModule, SyntheticFacePairs, SyntheticFaces, VerificationDataModule
from fame.data.face_modules import as_image_tensor, spread_indices
from fame.data.modules import flip_decision, mirror_at_random


class HalfLitFaces(Dataset):
    """(uint8 (H, W, 3) RGB, label) tuples, the RecordIO / identity-folder format: the left half
    of each image is bright, the right half dark, so a mirrored sample is easy to spot."""

    def __init__(self, length: int = 40, classes: int = 4, size: int = 16) -> None:
        self.length, self.classes, self.size = length, classes, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        image[:, : self.size // 2] = 200
        image[0, 0] = index  # the index, readable back from the pixel values
        return image, index % self.classes


def _mirrored(batch: dict) -> torch.Tensor:
    left, right = batch["image"][..., :8].mean(dim=(1, 2, 3)), batch["image"][..., 8:].mean(dim=(1, 2, 3))
    return right > left


def test_training_batches_have_the_right_shapes_types_and_ids():
    faces = SyntheticFaces(num_identities=5, images_per_identity=4, size=48)
    module = FaceTrainingDataModule(faces, val_fraction=0.25, batch_size=4)
    module.setup("fit")
    assert module.num_classes == 5
    assert len(module.train_set) == 15 and len(module.val_set) == 5
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 3, 48, 48) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, 48, 48)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert all(identifier.startswith("synface-0-") for identifier in batch["id"])
    assert len(module.train_dataloader()) == 3  # 15 samples: the incomplete batch is dropped
    val_ids = [i for batch in module.val_dataloader() for i in batch["id"]]
    train_ids = {module.train_set[position]["id"] for position in range(len(module.train_set))}
    assert len(val_ids) == 5 and not set(val_ids) & train_ids


def test_tuple_datasets_become_float_dicts_with_index_ids():
    module = FaceTrainingDataModule(HalfLitFaces(), val_fraction=0.1, batch_size=8, flip=False)
    module.setup()
    assert module.num_classes == 4  # found from the labels: the dataset declares none
    batch = next(iter(module.val_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].max() <= 1.0
    assert torch.allclose(batch["image"][:, 0, 0, 1], torch.full((4,), 200 / 255))
    indices = (batch["image"][:, 0, 0, 0] * 255).round().long()
    assert batch["id"] == [str(int(i)) for i in indices]
    assert torch.equal(batch["label"], indices % 4)


def test_limit_keeps_the_first_samples_and_the_split_is_seeded():
    faces = SyntheticFaces(num_identities=20, images_per_identity=10, size=48)
    module = FaceTrainingDataModule(faces, val_fraction=0.2, batch_size=4, limit=30, seed=1)
    module.setup()
    assert len(module.train_set) + len(module.val_set) == 30
    assert set(module.train_set.indices) | set(module.val_set.indices) == set(range(30))
    assert module.num_classes == 20  # the dataset's classes, not those of the first 30 samples
    again = FaceTrainingDataModule(faces, val_fraction=0.2, batch_size=4, limit=30, seed=1)
    other = FaceTrainingDataModule(faces, val_fraction=0.2, batch_size=4, limit=30, seed=2)
    again.setup()
    other.setup()
    assert again.val_set.indices == module.val_set.indices != other.val_set.indices
    tiny = FaceTrainingDataModule(faces, val_fraction=0.01, batch_size=2, limit=5)
    tiny.setup()
    assert len(tiny.val_set) == 1  # a positive fraction always holds out a sample


def test_flip_happens_in_training_only_keyed_by_seed_epoch_and_id_and_mirrors_the_masks_too():
    module = FaceTrainingDataModule(HalfLitFaces(length=200), val_fraction=0.2, batch_size=40, seed=3)
    module.setup()
    module.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer.training = True
    batches = [module.on_after_batch_transfer(batch, 0) for batch in module.train_dataloader()]
    flipped = torch.cat([_mirrored(batch) for batch in batches])
    assert flipped.tolist() == [flip_decision(i, 3, 0) for batch in batches for i in batch["id"]]
    assert 0.3 < flipped.float().mean() < 0.7
    module.trainer.validating = True
    assert not any(_mirrored(module.on_after_batch_transfer(batch, 0)).any() for batch in module.val_dataloader())
    unflipped = FaceTrainingDataModule(HalfLitFaces(length=200), batch_size=40, flip=False)
    unflipped.setup()
    unflipped.trainer = module.trainer
    module.trainer.training = True
    assert not any(
        _mirrored(unflipped.on_after_batch_transfer(batch, 0)).any() for batch in unflipped.train_dataloader()
    )

    faces = SyntheticFaces(num_identities=2, images_per_identity=8, size=48, occlusion="glasses")
    mirrored = FaceTrainingDataModule(faces, val_fraction=0.0, batch_size=16)
    mirrored.setup()
    (batch,) = list(mirrored.train_dataloader())
    for epoch in (0, 1):
        decisions = [flip_decision(i, 0, epoch) for i in batch["id"]]
        assert 0 < sum(decisions) < len(decisions)
        result = mirror_at_random(batch, 0, epoch)
        for key in ("image", "mask", "occluder_mask"):
            for k, flip in enumerate(decisions):
                assert torch.equal(result[key][k], batch[key][k].flip(-1) if flip else batch[key][k])
    assert decisions != [flip_decision(i, 0, 0) for i in batch["id"]]  # each epoch draws anew


def test_verification_loaders_keep_order_and_ids_and_limit_spreads_the_pairs():
    faces = SyntheticFaces(num_identities=6, images_per_identity=3, size=48)
    pairs = SyntheticFacePairs(faces, num_pairs=10, seed=1)
    module = VerificationDataModule(pairs, batch_size=4)
    module.setup("validate")
    expected = [f"synpair-0-1-{k}" for k in range(10)]
    for loader in (module.val_dataloader(), module.test_dataloader(), module.predict_dataloader()):
        batches = list(loader)
        assert [i for batch in batches for i in batch["id"]] == expected
        assert batches[0]["gallery"].shape == (4, 3, 48, 48) and batches[0]["probe_mask"].shape == (4, 1, 48, 48)
        assert batches[0]["same"].dtype == torch.bool
        assert batches[0]["same"].tolist() == [True, False, True, False]
    limited = VerificationDataModule(pairs, batch_size=4, limit=4)
    limited.setup()
    ids = [i for batch in limited.val_dataloader() for i in batch["id"]]
    assert ids == ["synpair-0-1-0", "synpair-0-1-3", "synpair-0-1-6", "synpair-0-1-9"]
    assert spread_indices(600, 4) == [0, 200, 399, 599] and spread_indices(3, 10) == [0, 1, 2]


class UintPairs(Dataset):
    """Pairs whose images come as uint8 (H, W, 3) arrays."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        image = np.full((8, 8, 3), 51 * index, dtype=np.uint8)
        return {"gallery": image, "probe": image, "same": np.bool_(index == 0), "id": f"p{index}"}


def test_verification_converts_uint8_pairs():
    module = VerificationDataModule(UintPairs(), batch_size=3)
    module.setup()
    batch = next(iter(module.test_dataloader()))
    assert batch["probe"].dtype == torch.float32
    assert torch.allclose(batch["probe"][:, 0, 0, 0], torch.tensor([0.0, 0.2, 0.4]))
    assert batch["same"].tolist() == [True, False, False] and batch["id"] == ["p0", "p1", "p2"]


def test_two_workers_deliver_the_same_batches_as_the_main_process():
    faces = SyntheticFaces(num_identities=4, images_per_identity=4, size=32)
    pairs = SyntheticFacePairs(faces, num_pairs=8)
    in_process, with_workers = (
        VerificationDataModule(pairs, batch_size=4),
        VerificationDataModule(pairs, batch_size=4, num_workers=2),
    )
    in_process.setup()
    with_workers.setup()
    for a, b in zip(in_process.val_dataloader(), with_workers.val_dataloader(), strict=True):
        assert a["id"] == b["id"] and torch.equal(a["probe"], b["probe"])
    training = FaceTrainingDataModule(faces, val_fraction=0.25, batch_size=4, num_workers=2)
    training.setup()
    batch = next(iter(training.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="val_fraction"):
        FaceTrainingDataModule(HalfLitFaces(), val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        VerificationDataModule(UintPairs(), batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        FaceTrainingDataModule(HalfLitFaces(), limit=0)
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        FaceTrainingDataModule(HalfLitFaces(), batch_size=64).setup()
    with pytest.raises(RuntimeError, match="setup"):
        FaceTrainingDataModule(HalfLitFaces(), batch_size=8).train_dataloader()
    bad = FaceTrainingDataModule([(np.zeros((8, 8), np.uint8), 0)] * 4, batch_size=2, val_fraction=0.0)
    bad.setup()
    with pytest.raises(ValueError, match=r"training sample 0: expected an RGB array of shape \(H, W, 3\)"):
        bad.train_set[0]
    with pytest.raises(TypeError, match="expected a uint8 RGB array"):
        as_image_tensor(np.zeros((4, 4, 3), np.float64), "sample x")
    missing = VerificationDataModule([{"gallery": torch.zeros(3, 4, 4)}], batch_size=1)
    missing.setup()
    with pytest.raises(KeyError, match="pair 0: expected a dict with the keys"):
        missing.pair_set[0]


class TinyFaceClassifier(L.LightningModule):
    """A small CNN with a cross-entropy head; embeds pairs for verification by cosine similarity."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, classes)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.head(self.body(batch["image"])), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_index: int) -> None:
        accuracy = (self.head(self.body(batch["image"])).argmax(1) == batch["label"]).float().mean()
        self.log("val_accuracy", accuracy, batch_size=len(batch["id"]))

    def predict_step(self, batch: dict, batch_index: int) -> dict:
        gallery, probe = self.body(batch["gallery"]), self.body(batch["probe"])
        return {"id": batch["id"], "score": nn.functional.cosine_similarity(gallery, probe), "same": batch["same"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_the_modules_train_and_evaluate_a_real_lightning_module():
    faces = SyntheticFaces(num_identities=4, images_per_identity=6, size=32)
    data = FaceTrainingDataModule(faces, val_fraction=0.25, batch_size=6)
    model = TinyFaceClassifier(data.num_classes)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    trainer = _trainer(max_steps=5, val_check_interval=3, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 5
    assert "val_accuracy" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    no_val = FaceTrainingDataModule(faces, val_fraction=0.0, batch_size=6)
    trainer = _trainer(max_steps=2)
    trainer.fit(TinyFaceClassifier(4), datamodule=no_val)
    assert trainer.global_step == 2 and "val_accuracy" not in trainer.callback_metrics

    pairs = VerificationDataModule(SyntheticFacePairs(SyntheticFaces(4, 3, size=32, first_identity=4), 6), batch_size=4)
    predictions = _trainer().predict(model, datamodule=pairs)
    assert [i for output in predictions for i in output["id"]] == [f"synpair-0-0-{k}" for k in range(6)]
    assert torch.cat([output["score"] for output in predictions]).shape == (6,)
