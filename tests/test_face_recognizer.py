"""FaceRecognizer: arcface_torch recipe, verification metrics, checkpoints, export, DDP validation."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fame.data import (
    FaceRecognitionDataModule,
    FaceTrainingDataModule,
    SyntheticFacePairs,
    SyntheticFaces,
    VerificationDataModule,
)
from fame.lightning.face import (
    SET_METRICS,
    FaceRecognizer,
    load_face_recognizer,
    pair_key,
)
from fame.lightning.schedules import polynomial_decay
from fame.metrics.verification import verification_report
from fame.models import FaceEmbedder, build_face_model

BACKBONE = {"arch": "small", "input_size": 32, "widths": [8, 16, 16, 32]}
EMBEDDING = 24
IDENTITIES = 8


def face_data(pair_batch_size=4):
    """8 training identities x 4 images; two verification sets on 6 other identities, odd pair counts."""
    faces = SyntheticFaces(num_identities=IDENTITIES, images_per_identity=4, size=32, seed=0)
    others = SyntheticFaces(num_identities=6, images_per_identity=3, size=32, seed=0, first_identity=100)
    return FaceRecognitionDataModule(
        FaceTrainingDataModule(faces, val_fraction=0.0, batch_size=8),
        {
            "synth": VerificationDataModule(SyntheticFacePairs(others, num_pairs=21), batch_size=pair_batch_size),
            "synth_b": VerificationDataModule(
                SyntheticFacePairs(others, num_pairs=13, seed=1), batch_size=pair_batch_size
            ),
        },
    )


def recognizer(**overrides):
    torch.manual_seed(0)
    settings = {"backbone": BACKBONE, "head": None, "num_classes": IDENTITIES, "embedding_size": EMBEDDING}
    return FaceRecognizer(**{**settings, **overrides})


def trainer(**overrides):
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=3,
        val_check_interval=3,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**settings, **overrides})


def expected_metrics(model, data, stage="val"):
    """The metrics computed directly: each set's pairs in order, flip-summed embeddings, cosine."""
    model.eval()
    expected = {}
    for name, module in data.verification.items():
        module.setup("validate")
        scores, labels = [], []
        with torch.no_grad():
            for batch in module.val_dataloader():
                gallery, probe = model.embed_with_flip(batch["gallery"]), model.embed_with_flip(batch["probe"])
                scores.append((gallery * probe).sum(1))
                labels.append(batch["same"])
        report = verification_report(torch.cat(scores), torch.cat(labels))
        expected[f"{stage}/{name}/acc"] = report["accuracy_mean"]
        expected[f"{stage}/{name}/acc_std"] = report["accuracy_std"]
        expected[f"{stage}/{name}/eer"] = report["eer"]
        expected[f"{stage}/{name}/eer_threshold"] = report["eer_threshold"]
        expected[f"{stage}/{name}/tar_at_far"] = report["tar_at_far"]
        for metric in ("kfold_val_at_far", "kfold_val_std", "kfold_far"):
            expected[f"{stage}/{name}/{metric}"] = report[metric]
        expected[f"{stage}/{name}/pairs"] = float(len(module.pair_set))
    expected[f"{stage}/acc_mean"] = (expected[f"{stage}/synth/acc"] + expected[f"{stage}/synth_b/acc"]) / 2
    return expected


def assert_metrics(logged, expected):
    assert set(expected) <= set(logged), sorted(set(expected) - set(logged))
    for name, value in expected.items():
        assert float(logged[name]) == pytest.approx(value, abs=1e-6), name


def test_fit_trains_and_validates_every_set(tmp_path):
    model, data = recognizer(), face_data()
    assert isinstance(model.embedder, FaceEmbedder) and model.embedder.input_size == (32, 32)
    before = [parameter.detach().clone() for parameter in model.embedder.parameters()]
    run = trainer()
    run.fit(model, data)
    assert run.global_step == 3
    assert any(not torch.equal(old, new) for old, new in zip(before, model.embedder.parameters()))
    logged = run.callback_metrics
    assert math.isfinite(float(logged["train/loss"]))
    for name in ("synth", "synth_b"):
        assert {f"val/{name}/{metric}" for metric in SET_METRICS} <= set(logged)
    assert_metrics(logged, expected_metrics(model, data))


def test_validate_and_test_log_the_same_protocol():
    model, data = recognizer(), face_data(pair_batch_size=5)
    run = trainer()
    run.validate(model, data, verbose=False)
    assert_metrics(run.callback_metrics, expected_metrics(model, data))
    run.test(model, data, verbose=False)
    assert_metrics(run.callback_metrics, expected_metrics(model, data, stage="test"))


def test_mixed_precision_fit_validates_in_float32():
    """bf16 autocast stands in on CPU for the GPU's 16-mixed: embeddings are summed and scored in float32."""
    model, data = recognizer(), face_data()
    run = trainer(precision="bf16-mixed", max_steps=2, val_check_interval=2)
    run.fit(model, data)
    assert math.isfinite(float(run.callback_metrics["train/loss"]))
    assert run.callback_metrics["val/synth/pairs"] == 21
    assert 0.0 <= float(run.callback_metrics["val/acc_mean"]) <= 1.0


def test_polynomial_decay_by_hand():
    assert [polynomial_decay(step, 4) for step in range(5)] == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    # 2 warm-up steps of 4: 0, 1/2, then (1 - 0/2)^2, (1 - 1/2)^2
    assert [polynomial_decay(step, 4, warmup_steps=2) for step in range(5)] == [0.0, 0.5, 1.0, 0.25, 0.0]
    assert polynomial_decay(9, 4) == 0.0
    assert polynomial_decay(1, 4, power=1.0) == 0.75


class LearningRates(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_sgd_with_polynomial_decay_per_step_is_the_default():
    model, rates = recognizer(), LearningRates()
    trainer(max_steps=4, limit_val_batches=0, callbacks=[rates]).fit(model, face_data())
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4
    assert rates.seen == pytest.approx([0.1 * factor for factor in (1.0, 0.5625, 0.25, 0.0625)])


def test_backbone_gradients_are_clipped_to_the_configured_norm():
    model = recognizer(clip_grad_norm=5.0)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 10.0)
    model.configure_gradient_clipping(optimizer=None)
    backbone_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.embedder.parameters()]))
    assert backbone_norm == pytest.approx(5.0, rel=1e-4)
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 10.0))  # the head is not clipped


@pytest.mark.parametrize(
    "head, kind",
    [
        (None, "ArcFaceHead"),
        ({"name": "arcface", "scale": 32.0, "margin": 0.3}, "ArcFaceHead"),
        ({"name": "cosface"}, "CosFaceHead"),
        ({"name": "combined", "m1": 1.0, "m2": 0.3, "m3": 0.2}, "CombinedMarginHead"),
        ({"name": "adaface"}, "AdaFaceHead"),
        ({"_target_": "fame.models.CosFaceHead", "margin": 0.2}, "CosFaceHead"),
    ],
)
def test_every_margin_head_gives_a_finite_loss(head, kind):
    model = recognizer(head=head).train()
    assert type(model.head).__name__ == kind
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(model.head(model(images), labels), labels)
    loss.backward()
    assert math.isfinite(loss.item()) and model.head.weight.grad is not None


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="head name must be one of"):
        recognizer(head={"name": "sphereface"})
    with pytest.raises(ValueError, match="needs an 'arch'"):
        recognizer(backbone={"input_size": 32})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        recognizer(optimizer="lbfgs")
    with pytest.raises(ValueError, match="set embedding_size=512"):
        recognizer(
            backbone={
                "_target_": "fame.models.build_face_model",
                "arch": "small",
                "input_size": 32,
                "embedding_size": 512,
            }
        )
    model, data = recognizer(val_sets=["only_one"]), face_data()
    with pytest.raises(ValueError, match="2 val dataloaders"):
        trainer().validate(model, data, verbose=False)
    training = FaceTrainingDataModule(
        SyntheticFaces(num_identities=4, images_per_identity=3, size=32), val_fraction=0.25, batch_size=4
    )
    with pytest.raises(ValueError, match="verification pairs"):
        trainer().validate(recognizer(val_sets=["faces"]), training, verbose=False)
    with pytest.raises(ValueError, match="'synth'.*cannot be split into 10 folds"):
        trainer(limit_val_batches=2).validate(recognizer(), face_data(), verbose=False)


def test_checkpoint_of_omegaconf_specs_loads_with_weights_only(tmp_path):
    model = recognizer(
        backbone=OmegaConf.create(BACKBONE),
        head=OmegaConf.create({"name": "cosface", "margin": 0.3}),
        val_sets=OmegaConf.create(["synth", "synth_b"]),
    )
    assert type(model.hparams.backbone) is dict and type(model.hparams.backbone["widths"]) is list
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/acc_mean", mode="max")
    trainer(enable_checkpointing=True, callbacks=[checkpoints]).fit(model, face_data())
    assert checkpoints.best_model_path
    content = torch.load(checkpoints.best_model_path, weights_only=True)
    assert content["hyper_parameters"]["head"] == {"name": "cosface", "margin": 0.3}
    reloaded = load_face_recognizer(checkpoints.best_model_path).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model.eval()(images))


def test_backbone_exports_load_back(tmp_path):
    model, data = recognizer(), face_data()
    trainer(limit_val_batches=0).fit(model, data)
    model.eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        from_state_dict = build_face_model(
            checkpoint=model.export_backbone(tmp_path / "backbone.pth"), **model.backbone_arguments
        )
        torch.testing.assert_close(from_state_dict(images), expected)
        from_onnx = build_face_model("onnx", model.export_backbone(tmp_path / "backbone.onnx"))
        torch.testing.assert_close(from_onnx(images), expected, atol=1e-4, rtol=1e-4)


def test_fine_tunes_from_pretrained_weights_and_reloads_without_them(tmp_path):
    pretrained = recognizer()
    weights = pretrained.export_backbone(tmp_path / "pretrained.pth")
    model = recognizer(backbone={**BACKBONE, "checkpoint": str(weights)})
    for name, value in pretrained.embedder.state_dict().items():
        torch.testing.assert_close(model.embedder.state_dict()[name], value)
    run = trainer(max_steps=1, limit_val_batches=0)
    run.fit(model, face_data())
    run.save_checkpoint(tmp_path / "fine_tuned.ckpt")
    weights.unlink()
    reloaded = load_face_recognizer(tmp_path / "fine_tuned.ckpt").eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model.eval()(images))


def test_pair_keys_are_stable_and_distinct():
    assert pair_key("lfw/0") == pair_key("lfw/0")
    assert len({pair_key(f"lfw/{index}") for index in range(1000)}) == 1000


def test_two_process_ddp_validation_equals_one_process():
    """gloo, 2 ranks: 21 and 13 pairs (odd), so DistributedSampler repeats a pair on the second rank."""
    model, data = recognizer(), face_data()
    expected = expected_metrics(model, data)
    run = trainer(strategy="ddp_spawn", devices=2)
    results = run.validate(model, face_data(), verbose=False)
    logged = {name: value for result in results for name, value in result.items()}
    assert logged["val/synth/pairs"] == 21 and logged["val/synth_b/pairs"] == 13
    assert_metrics(logged, expected)
