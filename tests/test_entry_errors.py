"""Bad input to train.py / explain.py / evaluate.py: one line on stderr, exit status 2, nothing written.

Subprocesses where the entry point's own handling matters; the stage functions in-process for the
variants of a check.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fame.config import ConfigError
from fame.data.images import CorruptSampleError
from fame.entry import check_group_choices, error_line
from fame.stages import explain, train
from fame.stages.train import RESUME_KEYS, check_resume_checkpoint
from fame.store import StoreMismatch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUIET = ("logger.enabled=false", "trainer.enable_progress_bar=false")
TINY_TRAIN = ("limit=8", "trainer.max_epochs=1", "data.datamodule.batch_size=8", *QUIET)


def config(name, output_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def run(script, *arguments):
    """(exit status, stdout, stderr lines) of an entry point."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(
        [sys.executable, str(ROOT / script), *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return process.returncode, process.stdout, [line for line in process.stderr.splitlines() if line.strip()]


def files_under(folder: Path):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def write_class_folders(root: Path, corrupt: str = "") -> None:
    """root/<class>/<n>.png: two classes of two 16 px images; ``corrupt`` names one file to truncate."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for n in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / label / f"{n}.png")
    if corrupt:
        data = (root / corrupt).read_bytes()
        (root / corrupt).write_bytes(data[: len(data) // 2])


def test_train_refuses_a_training_split_smaller_than_one_batch(tmp_path):
    status, _, errors = run(
        "train.py", f"paths.output_dir={tmp_path / 'out'}", "experiment=faces", "limit=20", "logger.enabled=false"
    )
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith(
        "train.py: data.datamodule: the training split has 20 samples, fewer than one batch of 64"
    )
    assert not (tmp_path / "out").exists()  # no run folder, no W&B run, no checkpoint


def test_train_refuses_a_resume_file_that_is_not_a_checkpoint(tmp_path):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("experiment log, not a checkpoint\n")
    with pytest.raises(ConfigError) as caught:
        train(config("train", tmp_path / "out", f"resume={notes}", *QUIET))
    assert error_line(caught.value).startswith(f"resume='{notes}' is not a readable checkpoint")
    assert files_under(tmp_path) == ["notes.ckpt"]  # no config.yaml or csv/ next to it, no output folder


def test_resume_needs_an_intact_training_checkpoint(tmp_path):
    """A finished tiny run's last.ckpt passes; the same file truncated, and the weights-only model.ckpt,
    are refused naming the file, before anything is written next to them."""
    train(config("train", tmp_path / "out", *TINY_TRAIN))
    (run_dir,) = (tmp_path / "out" / "shapes" / "train" / "runs").iterdir()
    last, weights = run_dir / "last.ckpt", run_dir / "model.ckpt"
    check_resume_checkpoint(last)
    assert set(RESUME_KEYS) <= set(torch.load(last, weights_only=True))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:-100])
    before = files_under(tmp_path)
    with pytest.raises(ConfigError, match=f"resume='{truncated}' is not a readable checkpoint"):
        train(config("train", tmp_path / "out", *TINY_TRAIN, f"resume={truncated}"))
    with pytest.raises(ConfigError, match=r"model\.ckpt' cannot resume training: it lacks \['optimizer_states'\]"):
        train(config("train", tmp_path / "out", *TINY_TRAIN, f"resume={weights}"))
    damaged = tmp_path / "damaged.ckpt"
    data = bytearray(last.read_bytes())
    with zipfile.ZipFile(last) as archive:  # flip one byte inside the stored pickle
        member = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    start = member.header_offset  # local header: 30 bytes, the name, then an extra field of the length at 28
    start += 30 + len(member.filename) + int.from_bytes(data[start + 28 : start + 30], "little")
    data[start + 5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="is damaged"):
        check_resume_checkpoint(damaged)
    assert files_under(tmp_path) == sorted(before + ["damaged.ckpt"])


def test_train_refuses_a_missing_or_empty_data_folder_before_the_run_folder(tmp_path):
    missing, empty = tmp_path / "no_such_folder", tmp_path / "empty"
    empty.mkdir()
    for root, problem in ((missing, "image folder not found"), (empty, "no class sub-folders found")):
        with pytest.raises(ConfigError) as caught:
            train(
                config(
                    "train",
                    tmp_path / "out",
                    "data=image_folder",
                    f"data.train_root={root}",
                    f"data.val_root={root}",
                    "data.num_classes=2",
                    *QUIET,
                )
            )
        line = error_line(caught.value)
        assert line.startswith("could not build data.datamodule") and f"{root}: {problem}" in line and "\n" not in line
    assert files_under(tmp_path) == ["empty"]


def test_a_corrupt_image_mid_training_is_one_line_naming_the_file_and_skip_corrupt(tmp_path):
    """The image is decoded in a DataLoader worker; the entry point reports the worker's own message."""
    images = tmp_path / "images"
    write_class_folders(images, corrupt="b/1.png")
    data = [
        "data=image_folder",
        f"data.train_root={images}",
        f"data.val_root={images}",
        "data.num_classes=2",
        "data.image_size=16",
        "data.datamodule.batch_size=2",
    ]
    status, _, errors = run(
        "train.py",
        f"paths.output_dir={tmp_path / 'out'}",
        *data,
        "data.datamodule.num_workers=1",
        "trainer.max_epochs=1",
        *QUIET,
    )
    assert status == 2 and not any("Traceback" in line for line in errors), errors
    (line,) = [line for line in errors if line.startswith("train.py:")]
    assert line.startswith(f"train.py: {images / 'b' / '1.png'}: cannot decode the image")
    assert "skip_corrupt" in line and line.endswith("(on the command line: data.skip_corrupt=true)")
    metrics = train(
        config(
            "train",
            tmp_path / "out",
            *data,
            "data.datamodule.num_workers=0",
            "data.skip_corrupt=true",
            "trainer.max_epochs=1",
            *QUIET,
        )
    )  # the suggested fix trains
    assert 0.0 <= metrics["val/acc"] <= 1.0


def test_a_worker_error_keeps_its_own_message():
    from torch._utils import ExceptionWrapper

    try:
        raise CorruptSampleError("x.png: cannot decode the image (truncated); pass skip_corrupt=True")
    except CorruptSampleError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CorruptSampleError) as caught:
        wrapped.reraise()
    assert "Original Traceback" in str(caught.value)
    assert error_line(caught.value) == "x.png: cannot decode the image (truncated); pass skip_corrupt=True"


def test_explain_reports_a_store_mismatch_as_one_line_naming_every_key(tmp_path):
    common = (
        f"paths.output_dir={tmp_path}",
        "checkpoint=null",
        "batch_size=4",
        "explainer=[fame]",
        "explainer.fame.iterations=2",
        "trainer.enable_progress_bar=false",
    )
    store = explain(config("explain", tmp_path, *common[1:], "limit=4"))
    listing = files_under(tmp_path)
    with pytest.raises(StoreMismatch) as caught:  # the same request in-process: the keys the line must name
        explain(config("explain", tmp_path, *common[1:], "limit=5"))
    differences = caught.value.differences
    assert [key for key, _, _ in differences] == ["meta.data.datamodule.limit", "meta.limit", "num_samples"]
    status, _, errors = run("explain.py", *common, "limit=5")
    assert status == 2 and len(errors) == 1, errors
    listed = "; ".join(f"{key}: stored {stored!r}, requested {requested!r}" for key, stored, requested in differences)
    assert errors[0].startswith(f"explain.py: the map store at {store.path} was made for other data: {listed}. ")
    assert files_under(tmp_path) == listing
    with pytest.raises(StoreMismatch) as caught:
        explain(config("explain", tmp_path, *common[1:], "limit=4", "explainer.fame.iterations=3"))
    line = error_line(caught.value)
    assert "holds maps of 'fame' made with other settings: method.iterations: stored 2, requested 3. " in line
    assert "new_group" in line and "\n" not in line


def test_unknown_group_choices_list_the_known_ones(tmp_path, capsys):
    status, _, errors = run("explain.py", f"paths.output_dir={tmp_path}", "explainer=[fame,gradcm]")
    known = ", ".join(sorted(path.stem for path in (CONFIGS / "explainer").glob("*.yaml")))
    assert status == 2 and errors == [f"explain.py: unknown explainer 'gradcm'; known: {known}"]
    assert files_under(tmp_path) == []
    with pytest.raises(SystemExit) as stopped:
        check_group_choices(["experiment=face", "limit=3"], CONFIGS, "train.py")
    assert stopped.value.code == 2
    known = ", ".join(sorted(path.stem for path in (CONFIGS / "experiment").glob("*.yaml")))
    assert capsys.readouterr().err == f"train.py: unknown experiment 'face'; known: {known}\n"
    check_group_choices(
        ["experiment=faces", "explainer=[fame,gradcam]", "explainer.fame.iterations=3", "data.root=/x"],
        CONFIGS,
        "train.py",
    )  # known names pass
    with pytest.raises(SystemExit):  # sweeps (-m) are checked value by value
        check_group_choices(["explainer=fame,nope"], CONFIGS, "explain.py")
