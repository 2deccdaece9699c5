"""Every experiment composes, and the real-data ones run on tiny files in their real formats."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_data_imagenet import imagenet, write_image  # noqa: F401  (imagenet: the fixture of tiny LOC files)
from test_data_recordio import pack, png, write_recordio
from test_data_verification import python2_pickle

from fame.models import build_face_model
from fame.models.export import export_state_dict
from fame.stages import evaluate, explain, train

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
EXPERIMENTS = {
    "shapes": ("train", "explain", "evaluate"),
    "shortcut": ("train", "explain", "evaluate"),
    "faces": ("train", "explain", "evaluate"),
    "ms1m": ("train", "explain", "evaluate"),
    "imagenet": ("train", "explain", "evaluate"),
    "face_pairs": ("explain", "evaluate"),
    "featuremap": ("explain",),
}
QUIET = ("logger.enabled=false", "trainer.enable_progress_bar=false")


def config(name, output_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.mark.parametrize("experiment, entry", [(e, s) for e, stages in EXPERIMENTS.items() for s in stages])
def test_every_experiment_composes(tmp_path, experiment, entry):
    composed = config(entry, tmp_path, f"experiment={experiment}")
    assert composed.data.task in ("classification", "verification")
    # each experiment writes under <output_dir>/<its name>/, so no two share a checkpoint, store or report
    assert composed.experiment_name == experiment and composed.paths.experiment_dir == f"{tmp_path}/{experiment}"
    defaults = {
        "train": {"run_root": "train/runs", "checkpoint": "train/model.ckpt"},
        "explain": {"store": "explain/maps.zarr", "checkpoint": "train/model.ckpt"},
        "evaluate": {"store": "explain/maps.zarr", "checkpoint": "train/model.ckpt", "output_dir": "evaluate"},
    }[entry]
    for key, path in defaults.items():
        if composed[key] is not None:  # imagenet and face_pairs explain a model config: checkpoint=null
            assert composed[key] == f"{tmp_path}/{experiment}/{path}", key


def face_pixels(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def write_ms1m(root: Path, identities: int = 4, per_identity: int = 4) -> None:
    """train.rec/.idx in the insightface convention (header record 0) and three .bin pair sets."""
    labels = [label for label in range(identities) for _ in range(per_identity)]
    first = len(labels) + 1
    payloads = [pack([float(first), float(first + identities)], b"")]
    payloads += [pack(float(label), png(face_pixels(key)), record_id=key + 1) for key, label in enumerate(labels)]
    for label in range(identities):
        payloads.append(pack([float(1 + label * per_identity), float(1 + (label + 1) * per_identity)], b""))
    write_recordio(root / "train.rec", payloads)
    for name in ("lfw", "cfp_fp", "agedb_30"):
        blobs = [png(face_pixels(100 + k)) for k in range(12)]
        (root / f"{name}.bin").write_bytes(python2_pickle(blobs, [k % 2 == 0 for k in range(6)]))


def test_ms1m_trains_on_recordio_and_verifies_on_bin_sets(tmp_path):
    root = tmp_path / "faces_emore"
    root.mkdir()
    write_ms1m(root)
    metrics = train(
        config(
            "train",
            tmp_path,
            "experiment=ms1m",
            f"data.root={root}",
            "model=face_small",
            "data.image_size=32",
            "module.embedding_size=128",
            "module.folds=2",
            "data.datamodule.training.batch_size=4",
            "data.datamodule.training.num_workers=0",
            "trainer.max_epochs=1",
            "trainer.precision=32-true",
            *QUIET,
        )
    )
    for name in ("lfw", "cfp_fp", "agedb_30"):
        assert f"val/{name}/acc" in metrics and metrics[f"val/{name}/pairs"] == 6
    assert (
        torch.load(tmp_path / "ms1m" / "train" / "model.ckpt", weights_only=True)["hyper_parameters"]["num_classes"]
        == 4
    )


def test_imagenet_explains_and_scores_boxes(tmp_path, imagenet):  # noqa: F811  (the imported fixture)
    images, mapping, solution = imagenet
    data = [
        f"data.root={images}",
        f"data.synsets={mapping}",
        f"data.annotations={solution}",
        "data.datamodule.num_workers=0",
    ]
    common = ["experiment=imagenet", *data, "model=resnet18_scratch", "data.num_classes=3"]
    store = explain(
        config(
            "explain",
            tmp_path,
            *common,
            "explainer=[fame,gradcam]",
            "explainer.fame.iterations=2",
            "batch_size=3",
            "trainer.enable_progress_bar=false",
        )
    )
    assert store.read("fame").shape == (3, 224, 224)
    scores = evaluate(
        config(
            "evaluate",
            tmp_path,
            *common,
            "logger.enabled=false",
            "families=[localization,deletion]",
            "deletion.fractions=[0,0.5,1]",
            "grid_rows=1",
            "bootstrap.resamples=20",
        )
    )
    assert {"iou_50", "pointing_game", "deletion_auc"} <= set(scores["metric"])


def test_face_pairs_explains_a_pretrained_checkpoint_on_a_pair_csv(tmp_path):
    root = tmp_path / "arface"
    root.mkdir()
    lines = ["G,P,T"]
    for k in range(4):
        for side in ("g", "p"):
            write_image(root / f"{side}{k}.png", face_pixels(10 * k + (side == "p") * (k % 2), size=32))
        lines.append(f"g{k}.png,p{k}.png,{1 - k % 2}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    checkpoint = tmp_path / "backbone.pth"
    export_state_dict(build_face_model("small", input_size=32), checkpoint)
    common = [
        "experiment=face_pairs",
        f"data.csv={tmp_path / 'pairs.csv'}",
        f"data.root={root}",
        "data.image_size=32",
        "model.arch=small",
        f"model.checkpoint={checkpoint}",
        "+model.input_size=32",
    ]
    store = explain(
        config(
            "explain",
            tmp_path,
            *common,
            "explainer=[fame,random]",
            "explainer.fame.iterations=2",
            "explainer.fame.blur_kernel=7",
            "batch_size=4",
            "data.pairs.num_workers=0",
            "trainer.enable_progress_bar=false",
        )
    )
    assert "fame/gallery.dissimilar" in store.entries and store.read("fame/probe.similar").shape == (4, 32, 32)
    scores = evaluate(
        config(
            "evaluate",
            tmp_path,
            *common,
            "logger.enabled=false",
            "families=[verification]",
            "grid_rows=1",
            "verification.percentages=[0,50,100]",
            "bootstrap.resamples=20",
            "data.pairs.num_workers=0",
        )
    )
    assert {"verification_deletion_auc", "verification_insertion_auc"} <= set(scores["metric"])
