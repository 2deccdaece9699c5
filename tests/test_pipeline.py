"""The embedded default end to end: the real configs, composed with tiny limits, on CPU."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from fame import pipeline
from fame.store import MapStore

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def config(name, output_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("outputs")
    metrics = pipeline.train(config("train", output, "limit=64", "trainer.max_epochs=1", "data.batch_size=32",
                                    "trainer.enable_progress_bar=false"))
    return output, metrics


def test_train_writes_checkpoint_and_offline_wandb_run(trained):
    output, metrics = trained
    assert 0.0 <= metrics["val/acc"] <= 1.0
    checkpoint = torch.load(output / "train" / "model.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["name"] == "small_cnn"
    runs = list((output / "wandb").glob("offline-run-*"))
    assert runs and any(run.glob("*.wandb") for run in runs)


def test_explain_resumes_and_evaluate_reports(trained):
    output, _ = trained
    explain = config("explain", output, "limit=6", "batch_size=4", "fame.iterations=3", "logger.enabled=false")
    assert explain.fame.iterations == 3 and explain.fame.blur_kernel == 15  # CLI-style override
    partial = pipeline.explain(config("explain", output, "limit=6", "batch_size=4", "fame.iterations=3",
                                      "methods=[fame]", "logger.enabled=false"))
    first = partial.read("fame")
    store = pipeline.explain(explain)  # fame is complete: only gradcam and random are computed
    assert store.methods == ["fame", "gradcam", "random"]
    assert (store.read("fame") == first).all()
    for method in store.methods:
        maps = store.read(method)
        assert maps.shape == (6, 64, 64) and maps.min() >= 0 and maps.max() <= 1

    per_sample = pipeline.evaluate(config("evaluate", output, "grid_rows=2", "logger.enabled=false"))
    assert set(per_sample["method"]) == {"fame", "gradcam", "random"} and len(per_sample) == 18
    report = output / "evaluate"
    summary = pd.read_csv(report / "metrics.csv", index_col=0)
    assert {"pointing_game_mean", "relevance_mass_mean"} <= set(summary.columns)
    assert "| fame" in (report / "metrics.md").read_text()
    assert (report / "overlays.png").stat().st_size > 1000


def test_explain_refuses_a_store_of_other_samples(trained):
    output, _ = trained
    store_path = output / "other.zarr"
    MapStore(store_path, ids=["x"], size=(64, 64))
    with pytest.raises(ValueError, match="different set"):
        pipeline.explain(config("explain", output, f"store={store_path}", "limit=2", "fame.iterations=1",
                                "logger.enabled=false"))


def test_training_resumes_from_last_checkpoint(trained, capsys):
    output, _ = trained
    assert (output / "train" / "resume" / "last.ckpt").exists()
    before = torch.load(output / "train" / "model.ckpt", weights_only=True)["state_dict"]
    pipeline.train(config("train", output, "limit=64", "trainer.max_epochs=1", "data.batch_size=32",
                          "trainer.enable_progress_bar=false", "logger.enabled=false"))
    assert "resuming training from" in capsys.readouterr().out
    last = torch.load(output / "train" / "resume" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the finished epoch is not trained again
    after = torch.load(output / "train" / "model.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_full_demo_beats_the_random_floor(tmp_path):
    """The demo's own settings: FAME and Grad-CAM must clearly beat random maps (about 4 min on CPU)."""
    metrics = pipeline.train(config("train", tmp_path, "logger.enabled=false"))
    assert metrics["val/acc"] > 0.9
    pipeline.explain(config("explain", tmp_path, "logger.enabled=false"))
    scores = pipeline.evaluate(config("evaluate", tmp_path, "logger.enabled=false"))
    means = scores.groupby("method")[["pointing_game", "relevance_mass"]].mean()
    for method in ("fame", "gradcam"):
        assert means.loc[method, "pointing_game"] > means.loc["random", "pointing_game"] + 0.3
        assert means.loc[method, "relevance_mass"] > 1.5 * means.loc["random", "relevance_mass"]
