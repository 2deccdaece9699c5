"""The three stages on the real configs, composed with tiny limits, on CPU."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from fame.config import ConfigError
from fame.stages import evaluate, explain, train
from fame.store import MapStore, StoreMismatch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
QUICK_TRAIN = ("limit=64", "trainer.max_epochs=1", "data.datamodule.batch_size=32", "trainer.enable_progress_bar=false")
QUICK_EXPLAIN = ("limit=6", "batch_size=4", "explainer.fame.iterations=3", "trainer.enable_progress_bar=false")


def config(name, output_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("outputs")
    metrics = train(config("train", output, *QUICK_TRAIN))
    return output, metrics


def test_train_writes_checkpoint_csv_and_offline_wandb_run(trained):
    output, metrics = trained
    assert 0.0 <= metrics["val/acc"] <= 1.0 and "val/acc_top5" in metrics
    checkpoint = torch.load(output / "shapes" / "train" / "model.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["_target_"] == "fame.models.SmallCNN"
    (run,) = (output / "shapes" / "train" / "runs").iterdir()
    assert (run / "FINISHED").exists() and (run / "last.ckpt").exists()
    assert "val/acc" in pd.read_csv(run / "csv" / "metrics.csv").columns
    runs = list((output / "wandb").glob("offline-run-*"))
    assert runs and any(run.glob("*.wandb") for run in runs)


@pytest.mark.parametrize(
    "override, key",
    [
        ("explainer.fame.step_size=abc", "explainer.fame.step_size"),
        ("batch_size=0", "batch_size"),
        ("target=predicted", "target"),
        ("explainer.fame.normalization=sum", "normalization"),
    ],
)
def test_explain_config_errors_name_the_key(trained, override, key):
    output, _ = trained
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        explain(config("explain", output, override))


@pytest.mark.parametrize(
    "override, key",
    [
        ("road.percentages=[0,50,150]", "road.percentages"),
        ("verification.percentages=[-10]", "verification.percentages"),
        ("deletion.fractions=[]", "deletion.fractions"),
        ("road.orders=[morf,up]", "road.orders"),
        ("road.imputations=[linear,mean]", "road.imputations"),
        ("families=[road,foo]", "families"),
        ("road.percentages=[10,50,100]", "road.percentages"),  # the logit drop is measured from P = 0
        ("deletion.fractions=[0,1,0.5]", "deletion.fractions"),
        ("verification.percentages=[0,50,50]", "verification.percentages"),
        ("deletion.protocol=black", "deletion.protocol"),
        ("sanity.randomization=shuffle", "sanity.randomization"),
    ],
)
def test_evaluate_config_errors_name_the_key_before_reading_the_store(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        evaluate(config("evaluate", tmp_path, override))  # no store exists in tmp_path


def test_train_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        train(config("train", tmp_path, "trainer.max_epochs=abc"))
    with pytest.raises(ConfigError, match="module.optimizer"):
        train(config("train", tmp_path, "module.optimizer=adam"))


def test_a_finished_run_is_not_resumed_by_another_configuration(trained, caplog):
    output, _ = trained
    runs = output / "shapes" / "train" / "runs"
    before = set(runs.iterdir())
    caplog.set_level(logging.INFO, logger="fame")
    train(config("train", output, *QUICK_TRAIN, "seed=1", "logger.enabled=false"))  # another seed: a new run
    assert "training in" in caplog.text
    train(config("train", output, *QUICK_TRAIN, "logger.enabled=false"))  # same config, finished: a fresh run too
    after = set(runs.iterdir())
    assert len(after - before) == 2 and all((run / "FINISHED").exists() for run in after)


def test_train_without_a_checkpoint_path_keeps_the_weights_in_the_run_folder(tmp_path):
    """checkpoint=null (as experiment=imagenet sets it): the run's model.ckpt is the only copy."""
    train(config("train", tmp_path, *QUICK_TRAIN, "checkpoint=null", "logger.enabled=false"))
    (run,) = (tmp_path / "shapes" / "train" / "runs").iterdir()
    assert (run / "model.ckpt").is_file() and (run / "FINISHED").exists()
    assert sorted(p.name for p in (tmp_path / "shapes" / "train").iterdir()) == ["runs"]


def test_explain_resumes_refuses_other_settings_and_evaluate_reports(trained):
    output, _ = trained
    partial = explain(config("explain", output, *QUICK_EXPLAIN, "explainer=[fame]", "experiment=shapes"))
    first = partial.read("fame")
    store = explain(config("explain", output, *QUICK_EXPLAIN, "experiment=shapes"))  # only gradcam and random run
    assert store.methods == ["fame", "gradcam", "random"]
    assert (store.read("fame") == first).all()
    for method in store.methods:
        maps = store.read(method)
        assert maps.shape == (6, 64, 64) and maps.min() >= 0 and maps.max() <= 1

    with pytest.raises(StoreMismatch, match="iterations"):
        explain(config("explain", output, *QUICK_EXPLAIN, "experiment=shapes", "explainer.fame.iterations=4"))
    store = explain(
        config(
            "explain",
            output,
            *QUICK_EXPLAIN,
            "experiment=shapes",
            "explainer=[fame]",
            "explainer.fame.iterations=4",
            "new_group=true",
        )
    )
    assert "fame@2" in store.methods

    scores = evaluate(
        config(
            "evaluate",
            output,
            "grid_rows=2",
            "logger.enabled=false",
            "methods=[fame,gradcam,random]",
            "road.percentages=[0,50,100]",
            "deletion.fractions=[0,0.5,1]",
            "bootstrap.resamples=50",
            "exclude_empty=false",
        )
    )  # the one-epoch model's margins start below 0
    assert set(scores["method"]) <= {"fame", "gradcam", "random"}
    assert {
        "pointing_game",
        "relevance_mass",
        "road_morf_zero_logit_drop",
        "road_lerf_linear_accuracy",
        "deletion_auc",
        "insertion_auc",
        "pr_auc",
    } <= set(scores["metric"])
    report = output / "shapes" / "evaluate"
    assert {"method", "metric", "level", "value", "sample_id"} <= set(pd.read_csv(report / "scores.csv").columns)
    assert "gradcam" in (report / "metrics.md").read_text()
    assert (report / "overlays.png").stat().st_size > 1000 and (report / "curves_road_morf.png").exists()
    assert "Deletion AUC ×100 (FAME protocol)" in (report / "metrics.md").read_text()
    assert "layers re-initialised" in (report / "metrics.md").read_text()

    rise = evaluate(
        config(
            "evaluate",
            output,
            "grid_rows=0",
            "logger.enabled=false",
            "methods=[gradcam]",
            "families=[deletion,sanity]",
            "deletion.protocol=rise",
            "sanity.randomization=redraw",
            "sanity.samples=2",
            "bootstrap.resamples=20",
            "exclude_empty=false",
            f"output_dir={output}/evaluate_rise",
        )
    )
    assert {"deletion_rise", "insertion_rise", "deletion_rise_auc", "sanity_redraw_spearman"} <= set(rise["metric"])
    assert rise[rise["metric"] == "deletion_rise"]["level"].nunique() == 65  # one row of the 64 px images per step
    table = (output / "evaluate_rise" / "metrics.md").read_text()
    assert "Deletion AUC ×100 (RISE protocol)" in table and "FAME protocol" not in table
    assert "layers redrawn from their own mean / std" in table


def test_evaluate_over_a_multirun_folder_tables_each_metric_against_the_swept_value(trained):
    output, _ = trained
    quick = [override for override in QUICK_EXPLAIN if not override.startswith("explainer.fame.iterations")]
    swept = subprocess.run(
        [
            sys.executable,
            "explain.py",
            "-m",
            f"paths.output_dir={output}",
            *quick,
            "experiment=shapes",
            "explainer=[fame]",
            "explainer.fame.iterations=2,4",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert swept.returncode == 0, swept.stderr[-2000:]
    sweep = output / "shapes" / "multirun"  # Hydra's job folders: <n>/maps.zarr beside <n>/.hydra/overrides.yaml
    assert sorted(path.name for path in sweep.glob("*/maps.zarr")) == ["maps.zarr", "maps.zarr"]
    assert not (ROOT / ".hydra").exists()  # a single run writes no Hydra files
    scores = evaluate(
        config(
            "evaluate",
            output,
            f"sweep={sweep}",
            "families=[localization]",
            "logger.enabled=false",
            f"output_dir={output}/sweep_report",
            "bootstrap.resamples=20",
            "exclude_empty=false",
        )
    )  # the one-epoch model leaves most margins below 0
    assert sorted(scores["explainer.fame.iterations"].unique()) == [2, 4]
    table = pd.read_csv(output / "sweep_report" / "sweep.csv")
    assert {"explainer.fame.iterations", "metric", "mean"} <= set(table.columns)
    assert (output / "sweep_report" / "sweep.png").exists()


def test_evaluate_names_methods_missing_from_the_store(trained):
    output, _ = trained
    explain(
        config(
            "explain",
            output,
            "limit=6",
            "experiment=shapes",
            "explainer=[random]",
            f"store={output}/partial.zarr",
            "trainer.enable_progress_bar=false",
        )
    )
    with pytest.warns(UserWarning, match="missing methods.*fame"):
        evaluate(
            config(
                "evaluate",
                output,
                f"store={output}/partial.zarr",
                "methods=[fame,random]",
                "logger.enabled=false",
                "families=[localization]",
                "grid_rows=0",
                f"output_dir={output}/partial_report",
                "bootstrap.resamples=20",
            )
        )
    assert "fame" in (output / "partial_report" / "metrics.md").read_text()


def test_evaluate_scores_do_not_depend_on_batch_size_or_on_the_other_methods(trained):
    """A sample's ROAD noise is keyed by its id, and each method is scored against its own target."""
    output, _ = trained
    store = f"{output}/targets.zarr"
    for method, target in (("random", "label"), ("gradcam", "prediction")):
        explain(
            config(
                "explain",
                output,
                "limit=6",
                "batch_size=6",
                "experiment=shapes",
                f"explainer=[{method}]",
                f"target={target}",
                f"store={store}",
                "trainer.enable_progress_bar=false",
            )
        )
    common = (
        f"store={store}",
        "logger.enabled=false",
        "families=[road]",
        "road.orders=[morf]",
        "road.imputations=[linear]",
        "road.percentages=[0,50,100]",
        "grid_rows=0",
        "bootstrap.resamples=20",
        "exclude_empty=false",
    )

    def scores(*overrides):
        frame = evaluate(config("evaluate", output, *common, f"output_dir={output}/targets_report", *overrides))
        return frame.sort_values(["method", "metric", "sample_id", "level"]).reset_index(drop=True)

    whole = scores("methods=[gradcam,random]", "batch_size=6")
    pd.testing.assert_frame_equal(whole, scores("methods=[gradcam,random]", "batch_size=4"))
    alone = scores("methods=[random]", "batch_size=6")
    pd.testing.assert_frame_equal(whole[whole["method"] == "random"].reset_index(drop=True), alone)


def test_explain_batch_size_auto(trained):
    output, _ = trained
    store = explain(
        config(
            "explain",
            output,
            "limit=3",
            "batch_size=auto",
            "explainer=[fame]",
            "experiment=shapes",
            "explainer.fame.iterations=2",
            f"store={output}/auto.zarr",
            "trainer.enable_progress_bar=false",
        )
    )
    assert store.completed("fame").all()


def test_faces_experiment_end_to_end(tmp_path):
    """ArcFace training, e+ / e- maps of both sides of each pair with every face method, Tab. 2 scores."""
    metrics = train(
        config(
            "train",
            tmp_path,
            "experiment=faces",
            "limit=48",
            "trainer.max_epochs=1",
            "data.datamodule.training.batch_size=16",
            "data.datamodule.verification.synthetic.limit=20",
            "module.folds=2",
            "logger.enabled=false",
            "trainer.enable_progress_bar=false",
        )
    )
    assert "val/synthetic/acc" in metrics and "val/synthetic/eer" in metrics
    store = explain(
        config(
            "explain",
            tmp_path,
            "experiment=faces",
            "limit=4",
            "batch_size=4",
            "explainer.fame.iterations=2",
            "explainer.corrrise.masks=8",
            "trainer.enable_progress_bar=false",
        )
    )
    assert set(store.methods) == {"fame", "gradcam", "random", "corrrise", "fggb"}
    for side in ("probe", "gallery"):
        for output in ("similar", "dissimilar"):
            maps = store.read(f"fame/{side}.{output}")
            assert maps.shape == (4, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert -1.0 <= store.method_provenance("fggb")["eer_threshold"] <= 1.0  # threshold: eer, from the clean pair scores
    scores = evaluate(
        config(
            "evaluate",
            tmp_path,
            "experiment=faces",
            "logger.enabled=false",
            "grid_rows=2",
            "verification.percentages=[0,50,100]",
            "bootstrap.resamples=20",
        )
    )
    assert {"verification_deletion_auc", "verification_insertion_auc", "relevance_mass"} <= set(scores["metric"])
    assert "Deletion AUC" in (tmp_path / "faces" / "evaluate" / "metrics.md").read_text()


def _run(script, *overrides, **popen):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def test_entry_points_name_the_wrong_key_and_exit_2(tmp_path):
    process = _run("train.py", f"paths.output_dir={tmp_path}", "data.datamodule.batch_size=0")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "train.py: config key 'data.datamodule.batch_size' has the value 0" in out
    assert not (tmp_path / "shapes").exists()  # refused before anything was built or written
    process = _run("evaluate.py", f"paths.output_dir={tmp_path}")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in out
    assert f"evaluate.py: no map store at {tmp_path}/shapes/explain/maps.zarr; run explain.py first" in out


def test_kill_9_mid_training_resumes_from_the_last_epoch(tmp_path):
    overrides = [
        f"paths.output_dir={tmp_path}",
        "limit=192",
        "data.datamodule.batch_size=32",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "logger.enabled=false",
    ]
    process = _run("train.py", *overrides)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "shapes" / "train" / "runs").glob("*/last.ckpt")):
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    time.sleep(0.2)  # let the checkpoint finish writing (a truncated one is skipped: test_train_skips_a_truncated...)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (run,) = (tmp_path / "shapes" / "train" / "runs").iterdir()
    assert not (run / "FINISHED").exists()
    epoch = torch.load(run / "last.ckpt", weights_only=True)["epoch"]
    assert epoch == 0
    resumed = _run("train.py", *overrides)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming the unfinished run {run}" in out
    assert (run / "FINISHED").exists() and len(list((tmp_path / "shapes" / "train" / "runs").iterdir())) == 1
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 1


def test_train_skips_a_truncated_checkpoint(tmp_path):
    from fame.stages.train import readable_checkpoint

    good = tmp_path / "epoch=0-step=6.ckpt"
    torch.save({"epoch": 0}, good)
    (tmp_path / "last.ckpt").write_bytes(good.read_bytes()[:-40])
    assert readable_checkpoint(tmp_path) == str(good)
    torch.save({"epoch": 1}, tmp_path / "last.ckpt")
    assert readable_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")


def test_explain_cli_on_two_cpu_processes_equals_one(trained, tmp_path):
    """python explain.py trainer=cpu_ddp: two gloo processes write the maps of one, each id once."""
    output, _ = trained
    common = [
        f"paths.output_dir={output}",
        "experiment=shapes",
        "limit=7",
        "batch_size=2",
        "explainer=[fame,random]",
        "explainer.fame.iterations=3",
        "trainer.enable_progress_bar=false",
    ]
    single = _run("explain.py", *common, f"store={tmp_path}/one.zarr")
    double = _run("explain.py", *common, f"store={tmp_path}/two.zarr", "trainer=cpu_ddp")
    for process in (single, double):
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
    one, two = MapStore(tmp_path / "one.zarr"), MapStore(tmp_path / "two.zarr")
    assert sorted(two.ids) == sorted(one.ids) and len(set(two.ids)) == 7
    assert (one.read("random", one.ids) == two.read("random", one.ids)).all()
    # FAME within one float16 step at 1 (the store's precision): the ranks batch other samples
    # together, and CPU convolutions may round a sample differently with another batch partner.
    np.testing.assert_allclose(two.read("fame", one.ids), one.read("fame", one.ids), rtol=0, atol=2**-11)


@pytest.mark.slow
def test_full_demo_beats_the_random_floor(tmp_path):
    """The demo's own settings: FAME and Grad-CAM must clearly beat random maps (a few minutes on CPU)."""
    metrics = train(config("train", tmp_path, "logger.enabled=false"))
    assert metrics["val/acc"] > 0.9
    explain(config("explain", tmp_path, "experiment=shapes"))
    scores = evaluate(config("evaluate", tmp_path, "logger.enabled=false", "families=[localization]"))
    means = (
        scores[scores["metric"].isin(["pointing_game", "relevance_mass"])].groupby(["method", "metric"])["value"].mean()
    )
    for method in ("fame", "gradcam"):
        assert means[(method, "pointing_game")] > means[("random", "pointing_game")] + 0.3
        assert means[(method, "relevance_mass")] > 1.5 * means[("random", "relevance_mass")]
