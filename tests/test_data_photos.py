"""The real-photo dataset: scikit-image / matplotlib photos with an ImageNet class and a box, and its experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fame.data import PhotoDataset
from fame.data.images import ResizeCrop
from fame.data.photos import DEFAULT_ANNOTATIONS, PHOTO_SOURCES, load_photo, read_photo_annotations
from fame.store import MapStore

ROOT = Path(__file__).resolve().parents[1]


def test_every_photo_is_a_224_sample_with_its_class_and_its_box_through_the_same_resize_and_crop() -> None:
    dataset = PhotoDataset()
    records = read_photo_annotations(DEFAULT_ANNOTATIONS)
    assert [record["id"] for record in dataset.records] == [
        "chelsea",
        "coffee",
        "rocket",
        "camera",
        "motorcycle",
        "grace_hopper",
    ]
    for index, record in enumerate(records):
        sample = dataset[index]
        assert set(sample) == {"image", "label", "boxes", "id"} and sample["id"] == record["id"]
        assert sample["image"].shape == (3, 224, 224) and 0 <= float(sample["image"].min()) <= 1
        assert sample["label"] == record["label"] and record["label"] in record["accepted"]
        assert load_photo(record["source"]).size == (record["width"], record["height"])
        expected = ResizeCrop(224, 224).boxes(torch.tensor([record["box"]]), record["width"], record["height"])
        assert torch.equal(sample["boxes"], expected) and sample["boxes"].shape == (1, 4)
        assert record["origin"] and record["class_name"]
    # coffee, 600 x 400 -> 336 x 224 (scale 0.56), then 56 px cropped on the left
    assert dataset[1]["boxes"][0].tolist() == pytest.approx([170 * 0.56 - 56, 15 * 0.56, 412 * 0.56 - 56, 310 * 0.56])


def test_ids_select_photos_in_order_and_unknown_ones_are_named() -> None:
    assert [PhotoDataset(ids=["rocket", "coffee"])[k]["id"] for k in range(2)] == ["rocket", "coffee"]
    with pytest.raises(ValueError, match=r"unknown photo ids \['dog'\]"):
        PhotoDataset(ids=["dog"])


def test_an_annotation_file_names_only_known_sources_and_valid_boxes(tmp_path) -> None:
    """Files are data: a source is looked up among PHOTO_SOURCES, never imported or called by its name."""
    record = dict(read_photo_annotations(DEFAULT_ANNOTATIONS)[0])
    for change, message in [
        ({"source": "os.system"}, "unknown source 'os.system'"),
        ({"box": [0, 0, 500, 300]}, r"box \[0, 0, 500, 300\] must be"),
        ({"label": 1000}, "not an ImageNet-1k class index"),
    ]:
        path = tmp_path / "photos.json"
        path.write_text(json.dumps({"photos": [{**record, **change}]}))
        with pytest.raises(ValueError, match=message):
            PhotoDataset(path)
    assert "os.system" not in PHOTO_SOURCES


def test_a_wrong_layer_is_one_line_before_any_map_is_written(tmp_path) -> None:
    """The layer names mean the same in the normalized input space (the bare timm network) as in pixels."""
    done = subprocess.run(
        [
            sys.executable,
            "explain.py",
            "experiment=photos",
            f"paths.output_dir={tmp_path}",
            "explainer=[fame,gradcam]",
            "explainer.gradcam.layer=blocks.9",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(
        "explain.py: explainer.gradcam.layer='blocks.9': the model has no submodule named 'blocks.9' (EfficientNet); "
        "close names: blocks.6, blocks.5"
    )
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "photos" / "explain" / "maps.zarr").exists()


def test_the_photos_experiment_explains_and_scores_the_boxes(tmp_path) -> None:
    """python explain.py experiment=photos limit=2 explainer=[fame,gradcam] (FAME at 25 steps), then evaluate.py
    and its comparison sheet."""
    common = ["experiment=photos", "limit=2", f"paths.output_dir={tmp_path}"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    explain = [
        sys.executable,
        "explain.py",
        *common,
        "explainer=[fame,gradcam]",
        "explainer.fame.iterations=25",
        "trainer.enable_progress_bar=false",
    ]
    done = subprocess.run(explain, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store = MapStore(tmp_path / "photos" / "explain" / "maps.zarr")
    assert store.read("fame").shape == store.read("gradcam").shape == (2, 224, 224)
    evaluate = [
        sys.executable,
        "evaluate.py",
        *common,
        "logger.enabled=false",
        "families=[localization]",
        "grid_rows=1",
        "bootstrap.resamples=20",
    ]
    done = subprocess.run(evaluate, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pointing game" in (tmp_path / "photos" / "evaluate" / "metrics.md").read_text()
    assert (tmp_path / "photos" / "evaluate" / "comparison.png").stat().st_size > 0
