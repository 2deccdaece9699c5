"""explain.py's own steps: the predicted target, the auto batch size and its use before Trainer.predict."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from nets import CappedMemory, TinyEmbedder
from torch import nn

from fame.explain import batching
from fame.explain.registry import MethodResult
from fame.stages import explain
from fame.stages.explain import auto_batch_size, method_identity
from fame.tasks import task_of

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def config(output_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="explain", overrides=[f"paths.output_dir={output_dir}", *overrides])


class NearTie(nn.Module):
    """Logits (m, (1 + 2^-10) m) of the image mean m: float32 predicts class 1; bfloat16 rounds
    both weights to 1, the logits tie and argmax takes class 0."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [1.0 + 2.0**-10]]))

    def forward(self, x):
        return self.head(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_the_predicted_target_does_not_depend_on_the_trainers_precision():
    model = NearTie()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images).argmax(dim=1).tolist() == [0] * 4  # the flip the trainer's autocast would cause
    assert model(images).argmax(dim=1).tolist() == [1] * 4
    explained = []

    def method(model, images, targets, *, ids):
        explained.append(targets.tolist())
        return MethodResult({"": torch.zeros(len(images), 1, 8, 8)}, {})

    compute = task_of("classification").batch_method(method, "prediction", "pixels")

    class Explainer(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            assert torch.is_autocast_enabled("cpu")
            return compute(self.model, {"image": batch[0], "label": [0] * len(batch[0]), "id": list("abcd")})

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.predict(Explainer(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4))
    assert explained == [[1] * 4]


@pytest.mark.parametrize("experiment,image_key,samples", [("shapes", "image", 24), ("faces", "probe", 12)])
def test_auto_batch_size_counts_the_images_fame_forwards_per_sample(
    tmp_path, monkeypatch, experiment, image_key, samples
):
    monkeypatch.setattr(batching, "ram_fits", batching.trial_fits)  # the CPU tries batches like a GPU: the cap bites
    model = CappedMemory(TinyEmbedder(), 24)
    size = auto_batch_size(
        config(tmp_path, f"experiment={experiment}", "explainer=[fame]"), model, {image_key: torch.rand(3, 12, 12)}
    )
    assert size == samples  # verification runs e+ and e- of each sample as one batch: 2 images per sample


def test_faces_experiment_with_auto_batch_size_and_the_eer_threshold(tmp_path):
    """FGGB's EER threshold reads the pairs in batches before the FAME batches run: auto is resolved first."""
    store = explain(
        config(
            tmp_path,
            "experiment=faces",
            "checkpoint=null",
            "model=face_checkpoint",
            "model.arch=small",
            "model.checkpoint=null",
            "+model.input_size=64",
            "limit=4",
            "batch_size=auto",
            "explainer=[fame]",
            "explainer.fame.iterations=2",
            "explainer.corrrise.masks=8",
            "trainer.enable_progress_bar=false",
            f"store={tmp_path}/maps.zarr",
        )
    )
    assert set(store.methods) == {"fame", "corrrise", "fggb"}
    assert all(store.missing_rows(method).size == 0 for method in store.methods)
    assert -1.0 <= store.method_provenance("fggb")["eer_threshold"] <= 1.0


def test_fame_speed_settings_are_config_keys_recorded_only_off_their_defaults(tmp_path):
    default = method_identity(config(tmp_path, "explainer=[fame]").explainer.fame, "explainer.fame")
    assert not {"precision", "channels_last", "compile"} & set(default)  # as in stores begun before these keys
    chosen = config(tmp_path, "explainer=[fame]", "explainer.fame.precision=bf16-mixed", "explainer.fame.compile=true")
    identity = method_identity(chosen.explainer.fame, "explainer.fame")
    assert identity["precision"] == "bf16-mixed" and identity["compile"] is True and "channels_last" not in identity
