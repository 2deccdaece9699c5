"""README "Your own model": a third-party nn.Module (tests/thirdparty_net.py) on an image folder from the
command line, with only the folder it explains; layer names and paths refused before the first map."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fame.data import ImageFolderDataset
from fame.data.folder import count_classes
from fame.store import MapStore

ROOT = Path(__file__).resolve().parents[1]
#: tests/ on the path makes ``thirdparty_net`` importable, as a user's own package would be.
ENVIRONMENT = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def image_folder(root: Path) -> Path:
    """root/val/<class>/<k>.png (two classes, two 40x48 PNGs each) and root/boxes.csv; returns root."""
    generator = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / "val" / name).mkdir(parents=True)
        for k in range(2):
            pixels = (generator.random((40, 48, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "val" / name / f"{k}.png")
    rows = ["cat/0.png,4,4,20,20", "cat/1.png,10,10,30,30", "dog/0.png,0,0,24,24", "dog/1.png,8,8,40,40"]
    (root / "boxes.csv").write_text("path,xmin,ymin,xmax,ymax\n" + "\n".join(rows) + "\n")
    return root


def run(script: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *arguments], cwd=ROOT, env=ENVIRONMENT, capture_output=True, text=True, timeout=300
    )


def own_model(root: Path, *extra: str) -> list:
    """The README's arguments: experiment=custom (model=custom, data=image_folder), the builder, the folder."""
    return [
        "experiment=custom",
        "model._target_=thirdparty_net.build",
        "+model.classes=2",
        f"data.val_root={root / 'val'}",
        f"data.boxes={root / 'boxes.csv'}",
        "data.image_size=32",
        f"paths.output_dir={root / 'outputs'}",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def test_a_third_party_model_is_explained_and_evaluated_from_the_command_line(tmp_path) -> None:
    root = image_folder(tmp_path)
    arguments = own_model(root, "model.target_layer=second")
    done = run(
        "explain.py",
        *arguments,
        "explainer=[fame,gradcam,random]",
        "explainer.fame.iterations=5",
        "explainer.fame.blur_kernel=7",
        "explainer.fame.blur_sigma=1.1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    store = MapStore(root / "outputs" / "custom" / "explain" / "maps.zarr")
    assert store.read("fame").shape == store.read("gradcam").shape == (4, 32, 32)
    assert store.meta["data"]["num_classes"] == 2  # from the class folders: no data.num_classes given
    assert store.method_settings("gradcam")["model"] == {
        "_target_": "thirdparty_net.build",
        "target_layer": "second",
        "classes": 2,
    }
    done = run(
        "evaluate.py",
        *arguments,
        "logger.enabled=false",
        "families=[localization,deletion]",
        "bootstrap.resamples=20",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = root / "outputs" / "custom" / "evaluate"
    assert "pointing game" in (evaluated / "metrics.md").read_text()
    assert (evaluated / "comparison.png").stat().st_size > 0


@pytest.mark.parametrize(
    "extra, line, advice",
    [
        (
            [],
            "explain.py: explainer.gradcam.layer=null (the model's target layer): No target layer is known for "
            "TwoConvNet of thirdparty_net",
            "model.target_layer=<name>",
        ),
        (
            ["model.target_layer=act"],
            "explain.py: explainer.gradcam.layer=null (the model's target layer): the layer 'act' (ReLU) runs 2 "
            "times in one forward pass",
            "choose a module that runs once",
        ),
        (
            ["model.target_layer=secnd"],
            "explain.py: model.target_layer=secnd: the model has no submodule named 'secnd' (TwoConvNet)",
            "close names: second",
        ),
        (
            ["model.target_layer=second", "input_space=normalized"],
            "explain.py: input_space=normalized needs a model that normalizes inside",
            "use input_space=pixels",
        ),
    ],
)
def test_a_layer_that_cannot_serve_is_one_line_before_any_map(tmp_path, extra, line, advice) -> None:
    root = image_folder(tmp_path)
    done = run("explain.py", *own_model(root, *extra), "explainer=[fame,gradcam]")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(line) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert advice in done.stderr
    assert not (root / "outputs" / "custom" / "explain" / "maps.zarr").exists()


def test_an_image_folder_without_its_folder_is_one_line_naming_the_key(tmp_path) -> None:
    done = run("explain.py", "data=image_folder", "checkpoint=null", f"paths.output_dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "explain.py: config key 'data.val_root' is missing (???); give it on the command line: data.val_root=..."
    )


def test_classes_come_from_the_folders_or_a_synsets_file_in_its_order(tmp_path) -> None:
    root = image_folder(tmp_path) / "val"
    assert ImageFolderDataset(root).classes == ["cat", "dog"] and count_classes(None, None, root) == 2
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n001 bird\ndog domestic dog\ncat house cat\n")
    dataset = ImageFolderDataset(root, size=32, synsets=synsets)
    assert dataset.classes == ["n001", "dog", "cat"] and count_classes(synsets, None, root) == 3
    assert [dataset[k]["label"] for k in range(len(dataset))] == [1, 1, 2, 2]
    assert [dataset[k]["id"] for k in range(len(dataset))] == ["dog/0.png", "dog/1.png", "cat/0.png", "cat/1.png"]
    synsets.write_text("dog\n")
    with pytest.raises(ValueError, match=r"the class folders \['cat'\] are not named in the synsets file"):
        ImageFolderDataset(root, synsets=synsets)
