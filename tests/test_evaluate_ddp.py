"""Two-process CPU DDP evaluate runs (gloo) write the scores.csv of a single-process run.

Lightning's predict sampler gives the ranks uneven shares of an odd number of samples; the ranks'
rows are merged in dataset order (fame.lightning.ScoreWriter), so the files hold the same rows in
the same order. Values agree to float32 rounding: a rank's batches hold other images than the single
process's, and in float32 the batch composition changes the convolutions' summation order (README,
"In Python"), e.g. a ROAD logit drop of -5.2182004e-05 against -5.2180141e-05.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_data_imagenet import write_image
from test_experiments import face_pixels
from torch.utils.data import DataLoader

from fame.data.modules import collate_items
from fame.lightning import Indexed, ScoreModule, ScoreWriter
from fame.models import build_face_model
from fame.models.export import export_state_dict
from fame.stages import evaluate, explain

ROOT = Path(__file__).resolve().parents[1]
QUIET = ("logger.enabled=false", "trainer.enable_progress_bar=false", "grid_rows=0", "bootstrap.resamples=20")
SHAPES = ("checkpoint=null", "limit=7")
SCORED = (
    "families=[localization,road,deletion]",
    "road.percentages=[0,50,100]",
    "road.orders=[morf]",
    "deletion.fractions=[0,0.5,1]",
    "batch_size=2",
    "exclude_empty=false",
)
FORKED = ("trainer=cpu_ddp", "trainer.strategy=ddp_fork")


def config(name, output_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory):
    """Grad-CAM and random maps of 7 shapes images for a randomly initialised SmallCNN (seed 0)."""
    output = tmp_path_factory.mktemp("outputs")
    explain(
        config(
            "explain",
            output,
            *SHAPES,
            "batch_size=4",
            "explainer=[gradcam,random]",
            "trainer.enable_progress_bar=false",
        )
    )
    return output


def scores_csv(output: Path, name: str, *overrides) -> pd.DataFrame:
    evaluate(config("evaluate", output, *SHAPES, *QUIET, *SCORED, f"output_dir={output}/{name}", *overrides))
    return pd.read_csv(output / name / "scores.csv")


def test_two_forked_ranks_score_as_one_process(shapes_store):
    single = scores_csv(shapes_store, "single")
    assert set(single["method"]) == {"gradcam", "random"} and single["sample_id"].nunique() == 7
    assert {"pointing_game", "road_morf_linear_logit_drop", "deletion_auc"} <= set(single["metric"])
    pd.testing.assert_frame_equal(scores_csv(shapes_store, "forked", *FORKED), single)
    assert not list(shapes_store.glob("*/.scores-*")), "the ranks' row files are removed after the merge"


def test_two_launched_ranks_score_as_one_process(shapes_store):
    """``trainer=cpu_ddp``: Lightning starts rank 1 by running evaluate.py again; rank 0 writes the reports."""
    single = scores_csv(shapes_store, "single_launched")
    output = shapes_store / "launched"
    command = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        f"paths.output_dir={shapes_store}",
        *SHAPES,
        *QUIET,
        *SCORED,
        f"output_dir={output}",
        "trainer=cpu_ddp",
    ]
    finished = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"}
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(output / "scores.csv"), single)
    assert (output / "metrics.md").is_file() and not list(output.glob(".scores-*"))


def test_two_forked_ranks_score_verification_pairs_as_one_process(tmp_path):
    """A pretrained face checkpoint on 5 pairs of a pair CSV: the EER threshold is computed on every rank."""
    root = tmp_path / "pairs"
    root.mkdir()
    lines = ["G,P,T"]
    for k in range(5):
        for side in ("g", "p"):
            write_image(root / f"{side}{k}.png", face_pixels(10 * k + (side == "p") * (k % 2), size=32))
        lines.append(f"g{k}.png,p{k}.png,{1 - k % 2}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    checkpoint = tmp_path / "backbone.pth"
    export_state_dict(build_face_model("small", input_size=32), checkpoint)
    common = (
        "experiment=face_pairs",
        f"data.csv={tmp_path / 'pairs.csv'}",
        f"data.root={root}",
        "data.image_size=32",
        "model.arch=small",
        f"model.checkpoint={checkpoint}",
        "+model.input_size=32",
        "data.pairs.num_workers=0",
    )
    explain(
        config("explain", tmp_path, *common, "explainer=[random]", "batch_size=4", "trainer.enable_progress_bar=false")
    )
    scored = (*common, *QUIET, "families=[verification]", "verification.percentages=[0,50,100]", "batch_size=2")
    evaluate(config("evaluate", tmp_path, *scored, f"output_dir={tmp_path}/single"))
    evaluate(config("evaluate", tmp_path, *scored, *FORKED, f"output_dir={tmp_path}/forked"))
    single = pd.read_csv(tmp_path / "single" / "scores.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "forked" / "scores.csv"), single)
    assert {"verification_deletion_auc", "verification_insertion_auc"} <= set(single["metric"])
    assert single["sample_id"].nunique() == 5


def test_score_writer_keeps_one_copy_of_a_repeated_row_in_dataset_order(tmp_path):
    """A padding sampler (DistributedSampler repeats rows to even out the ranks) hands row 2 twice;
    the merge keeps it once and puts the samples in dataset order."""
    samples = [{"id": f"s{i}", "x": torch.tensor([float(i)])} for i in range(3)]

    def score_batch(batch):
        return [
            {"method": "m", "metric": metric, "level": level, "value": float(x) * scale, "sample_id": sid}
            for sid, x in zip(batch["id"], batch["x"][:, 0])
            for metric, level, scale in (("curve", 0.5, 1 / 3), ("scalar", math.nan, 1.0))
        ]

    writer = ScoreWriter(tmp_path / "rows")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[writer],
    )
    loader = DataLoader(Indexed(samples), sampler=[2, 0, 1, 2], batch_size=2, collate_fn=collate_items)
    trainer.predict(ScoreModule(torch.nn.Identity(), score_batch), loader, return_predictions=False)
    rows = writer.merge(trainer.world_size, [0, 1, 2])
    assert [(row["sample_id"], row["metric"]) for row in rows] == [
        (f"s{i}", metric) for i in range(3) for metric in ("curve", "scalar")
    ]
    assert [row["value"] for row in rows if row["metric"] == "curve"] == [0.0, 1 / 3, 2 / 3]  # floats read back exactly
    assert all(math.isnan(row["level"]) for row in rows if row["metric"] == "scalar")
    assert not (tmp_path / "rows").exists()


def test_score_writer_names_samples_no_rank_scored(tmp_path):
    writer = ScoreWriter(tmp_path / "rows")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[writer],
    )
    samples = [{"id": f"s{i}", "x": torch.tensor([float(i)])} for i in range(2)]
    loader = DataLoader(Indexed(samples), batch_size=2, collate_fn=collate_items)
    trainer.predict(ScoreModule(torch.nn.Identity(), lambda batch: []), loader, return_predictions=False)
    with pytest.raises(RuntimeError, match=r"1 samples were not scored by any rank, e.g. dataset rows \[5\]"):
        writer.merge(trainer.world_size, [0, 1, 5])
