"""The README's command sequence in one output folder: `make demo` (train.py, explain.py, evaluate.py
with the defaults), then the faces commands, then the demo's explain.py again. Each experiment keeps its
own checkpoint, store and report, so nothing is overwritten or refused. Tiny limits keep it on CPU."""

import hashlib
from pathlib import Path

from hydra import compose, initialize_config_dir

from fame.stages import evaluate, explain, train

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
QUIET = ("logger.enabled=false", "trainer.enable_progress_bar=false")
TINY = {
    ("train", "shapes"): ("limit=32", "trainer.max_epochs=1", "data.datamodule.batch_size=32", *QUIET),
    ("explain", "shapes"): (
        "limit=4",
        "batch_size=4",
        "explainer.fame.iterations=2",
        "trainer.enable_progress_bar=false",
    ),
    ("evaluate", "shapes"): (
        "logger.enabled=false",
        "families=[localization]",
        "bootstrap.resamples=10",
        "grid_rows=1",
        "exclude_empty=false",
    ),
    ("train", "faces"): (
        "limit=48",
        "trainer.max_epochs=1",
        "data.datamodule.training.batch_size=16",
        "data.datamodule.verification.synthetic.limit=20",
        "module.folds=2",
        *QUIET,
    ),
    ("explain", "faces"): (
        "limit=4",
        "batch_size=4",
        "explainer.fame.iterations=2",
        "explainer.corrrise.masks=8",
        "trainer.enable_progress_bar=false",
    ),
    ("evaluate", "faces"): (
        "logger.enabled=false",
        "verification.percentages=[0,50,100]",
        "bootstrap.resamples=10",
        "grid_rows=1",
    ),
}


def command(stage, output, *overrides):
    """The config of `python <stage>.py <overrides>` (plus the tiny limits) writing under ``output``."""
    experiment = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "shapes")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(
            config_name=stage, overrides=[f"paths.output_dir={output}", *overrides, *TINY[stage, experiment]]
        )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_then_faces_in_one_output_folder(tmp_path):
    shapes, faces = tmp_path / "shapes", tmp_path / "faces"
    train(command("train", tmp_path))  # make demo
    explain(command("explain", tmp_path))
    evaluate(command("evaluate", tmp_path))
    shapes_checkpoint = digest(shapes / "train" / "model.ckpt")

    train(command("train", tmp_path, "experiment=faces"))  # the README's faces commands
    store = explain(command("explain", tmp_path, "experiment=faces"))
    evaluate(command("evaluate", tmp_path, "experiment=faces"))

    assert digest(shapes / "train" / "model.ckpt") == shapes_checkpoint
    assert (faces / "train" / "model.ckpt").is_file() and store.path == faces / "explain" / "maps.zarr"
    assert store.meta["task"] == "verification"
    assert "pointing game" in (shapes / "evaluate" / "metrics.md").read_text()
    assert "Deletion AUC" in (faces / "evaluate" / "metrics.md").read_text()
    again = explain(command("explain", tmp_path))  # the demo's maps are still there, complete
    assert again.path == shapes / "explain" / "maps.zarr" and again.meta["task"] == "classification"
    assert all(again.completed(method).all() for method in ("fame", "gradcam", "random"))
