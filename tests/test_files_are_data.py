"""Files are data: a store, a checkpoint or a run folder names nothing that is built, unless trusted.

The crafted nodes below write a file when Hydra builds them (checked first, so that "the file is
not written" means something); every refusal is one line naming the file, the key and the fix.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fame.config import ConfigError, UntrustedFileError, check_file_data, instantiate
from fame.lightning import FaceRecognizer, ImageClassifier, load_face_recognizer
from fame.pipeline import explained_model
from fame.stages import evaluate, explain, train
from fame.stages.evaluate import store_config
from fame.store import MapStore

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
SMALL_CNN = {"_target_": "fame.models.SmallCNN", "num_classes": 4, "widths": [4, 8, 8, 8]}
SMALL_FACE = {"arch": "small", "input_size": 32}


def config(name, output_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def writes(path):
    """A node that creates ``path`` when built: ``pathlib.Path(path).write_text("written")``."""
    return {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(path)]},
        "data": "written",
    }


def truncates(path):
    """A node that empties ``path`` when built: ``open(path, "w")``."""
    return {"_target_": "builtins.open", "file": str(path), "mode": "w"}


def save_module(module, path, training_state=False, **hyperparameters):
    """A weights-only Lightning checkpoint of ``module`` with its hyper-parameters (``hyperparameters`` replacing some);
    ``training_state`` adds the (empty) optimizer and loop states that a resumable checkpoint has."""
    extra = {"optimizer_states": [], "loops": {}} if training_state else {}
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": {**dict(module.hparams), **hyperparameters},
            "pytorch-lightning_version": L.__version__,
            **extra,
        },
        path,
    )
    torch.load(path, weights_only=True)  # what the README promises: it loads weights-only
    return path


def one_line_refusal(result):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def run(script, *overrides, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_crafted_nodes_write_files_when_built(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    instantiate(writes(tmp_path / "created.txt"), "node")
    instantiate(truncates(victim), "node").close()
    assert (tmp_path / "created.txt").read_text() == "written" and victim.read_text() == ""


# ---------------------------------------------------------------------------------------------- stores


def shapes_store(path, data):
    return MapStore.create_or_open(
        path, num_samples=4, size=(64, 64), meta={"task": "classification", "data": data, "split": "test", "limit": 4}
    )


def shapes_data(tmp_path):
    return OmegaConf.to_container(config("explain", tmp_path).data, resolve=True)


def test_evaluate_refuses_a_store_whose_data_config_writes_files(tmp_path):
    created, victim = tmp_path / "created.txt", tmp_path / "precious.txt"
    victim.write_text("precious")
    data = shapes_data(tmp_path)
    data["datamodule"]["val"]["seed"] = writes(created)
    data["datamodule"]["test"]["seed"] = truncates(victim)
    store = shapes_store(tmp_path / "sent.zarr", data)

    line = one_line_refusal(
        run("evaluate.py", f"paths.output_dir={tmp_path / 'out'}", f"store={store.path}", "logger.enabled=false")
    )
    assert str(store.path) in line and "meta.data.datamodule.val.seed._target_" in line
    assert "pathlib.Path.write_text" in line and f"trust=[{store.path}]" in line
    assert not created.exists() and victim.read_text() == "precious"
    assert not (tmp_path / "out").exists()


def test_a_store_may_not_open_a_file_for_writing_resolve_an_interpolation_or_grant_trust(tmp_path):
    base = shapes_data(tmp_path)
    evaluate_config = config("evaluate", tmp_path)
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    crafted = {
        "datamodule.train.length": (truncates(victim), "builtins.open"),
        "datamodule.test.image_size": ("${oc.env:HOME}", "an interpolation"),
        "datamodule.test.trust": (True, "only the user can set"),
    }
    for number, (key, (value, named)) in enumerate(crafted.items()):
        data = json.loads(json.dumps(base))
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
        store = shapes_store(tmp_path / f"sent{number}.zarr", data)
        with pytest.raises(UntrustedFileError) as refused:
            store_config(evaluate_config, store)
        assert f"meta.data.{key}" in str(refused.value) and named in str(refused.value)
        assert str(store.path) in str(refused.value) and "\n" not in str(refused.value)
    assert victim.read_text() == "precious"


def test_a_project_builder_in_a_file_takes_only_its_own_arguments(tmp_path):
    data = {"datamodule": {"_target_": "fame.data.ShapesDataset", "length": 4, "root": "/elsewhere"}}
    with pytest.raises(
        ConfigError,
        match=r"sent.zarr holds data.datamodule = fame.data.ShapesDataset with the argument\(s\) \['root'\]",
    ):
        check_file_data(data, "sent.zarr", "data")


def test_trust_lets_a_users_own_store_with_a_custom_target_through(tmp_path):
    data = shapes_data(tmp_path)
    data["datamodule"]["test"] = {
        "_target_": "torch.utils.data.Subset",
        "dataset": data["datamodule"]["test"],
        "indices": [0, 1, 2, 3],
    }
    store = shapes_store(tmp_path / "mine.zarr", data)
    with pytest.raises(UntrustedFileError, match=r"meta.data.datamodule.test._target_ = 'torch.utils.data.Subset'"):
        store_config(config("evaluate", tmp_path), store)
    trusted = store_config(config("evaluate", tmp_path, f"trust=[{store.path}]"), store)
    assert trusted.data.datamodule.test._target_ == "torch.utils.data.Subset"
    sweep = tmp_path / "multirun"  # trusting a sweep folder trusts the stores in it
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- explainer.fame.iterations=2\n")
    store_config(config("evaluate", tmp_path, f"sweep={sweep}", f"trust=[{sweep}]"), store)
    # a target the user's own config names is not refused in the store either
    named = config("evaluate", tmp_path, "data.datamodule.test._target_=torch.utils.data.Subset")
    assert store_config(named, store).data.datamodule.test.indices == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def classifier():
    return ImageClassifier(model=SMALL_CNN)


@pytest.fixture(scope="module")
def recognizer():
    return FaceRecognizer(backbone=SMALL_FACE, head=None, num_classes=3, embedding_size=16)


CRAFTED_SPECS = {  # (module, hyper-parameter, where the node goes, key named in the refusal)
    "model": ("classifier", lambda node: {**SMALL_CNN, "dropout": node}, "hyper_parameters.model.dropout._target_"),
    "model_target": ("classifier", lambda node: node, "hyper_parameters.model._target_"),
    "backbone": (
        "recognizer",
        lambda node: {**SMALL_FACE, "dropout": node},
        "hyper_parameters.backbone.dropout._target_",
    ),
    "head": ("recognizer", lambda node: {"name": "arcface", "margin": node}, "hyper_parameters.head.margin._target_"),
}


@pytest.mark.parametrize("spec", list(CRAFTED_SPECS))
@pytest.mark.parametrize("node", [writes, truncates])
def test_a_crafted_weights_only_checkpoint_is_refused_by_every_loader(tmp_path, request, spec, node):
    fixture, crafted, key = CRAFTED_SPECS[spec]
    module = request.getfixturevalue(fixture)
    hyperparameter = "model" if fixture == "classifier" else spec.split("_")[0]
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    path = save_module(module, tmp_path / "sent.ckpt", **{hyperparameter: crafted(node(victim))})
    module_class = type(module)
    loaders = [
        lambda: module_class.load_from_checkpoint(path),
        lambda: (ImageClassifier.load_from_checkpoint if fixture == "classifier" else load_face_recognizer)(path),
    ]
    for load in loaders:
        with pytest.raises(UntrustedFileError) as refused:
            load()
        message = str(refused.value)
        assert message.startswith(f"{path} holds {key} = '{node(victim)['_target_']}'") and "trust=True" in message
    assert victim.read_text() == "precious"


def test_explain_refuses_a_crafted_checkpoint_before_writing_anything(tmp_path, classifier):
    created = tmp_path / "created.txt"
    path = save_module(classifier, tmp_path / "sent.ckpt", model={**SMALL_CNN, "dropout": writes(created)})
    line = one_line_refusal(run("explain.py", f"paths.output_dir={tmp_path / 'out'}", f"checkpoint={path}", "limit=2"))
    assert line.startswith(
        f"explain.py: {path} holds hyper_parameters.model.dropout._target_ = 'pathlib.Path.write_text'"
    )
    assert f"trust=[{path}]" in line
    assert not created.exists() and not (tmp_path / "out").exists()


def test_train_refuses_to_resume_a_crafted_checkpoint_before_writing_anything(tmp_path, classifier):
    created, runs = tmp_path / "created.txt", tmp_path / "runs"
    runs.mkdir()
    path = save_module(
        classifier, runs / "sent.ckpt", training_state=True, model={**SMALL_CNN, "widths": [writes(created)]}
    )
    line = one_line_refusal(
        run("train.py", f"paths.output_dir={tmp_path / 'out'}", f"resume={path}", "limit=8", "logger.enabled=false")
    )
    assert line.startswith(
        f"train.py: {path} holds hyper_parameters.model.widths.0._target_ = 'pathlib.Path.write_text'"
    )
    assert not created.exists() and sorted(p.name for p in runs.iterdir()) == ["sent.ckpt"]
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_crafted_checkpoint(tmp_path, classifier):
    store = explain(
        config(
            "explain",
            tmp_path,
            "checkpoint=null",
            "explainer=[random]",
            "limit=2",
            "trainer.enable_progress_bar=false",
            "data.datamodule.test.length=4",
        )
    )
    created = tmp_path / "created.txt"
    path = save_module(classifier, tmp_path / "sent.ckpt", model={**SMALL_CNN, "dropout": writes(created)})
    with pytest.raises(
        UntrustedFileError, match=r"hyper_parameters.model.dropout._target_ = 'pathlib.Path.write_text'"
    ):
        evaluate(
            config(
                "evaluate",
                tmp_path,
                f"store={store.path}",
                f"checkpoint={path}",
                "logger.enabled=false",
                "families=[localization]",
            )
        )
    assert not created.exists() and not (tmp_path / "shapes" / "evaluate").exists()


def test_trust_or_the_command_line_lets_a_users_own_target_through(tmp_path):
    own = ImageClassifier(model={"_target_": "nets.TinyClassifier", "classes": 4})
    path = save_module(own, tmp_path / "mine.ckpt")
    with pytest.raises(UntrustedFileError, match=r"hyper_parameters.model._target_ = 'nets.TinyClassifier'"):
        ImageClassifier.load_from_checkpoint(path)
    for loaded in (
        ImageClassifier.load_from_checkpoint(path, trust=True),
        ImageClassifier.load_from_checkpoint(path, named_targets={"nets.TinyClassifier"}),
    ):
        assert all(torch.equal(value, own.state_dict()[key]) for key, value in loaded.state_dict().items())
    # explain.py: trust=[PATH], or the same target given on the command line
    for overrides in ([f"trust=[{path}]"], ["model._target_=nets.TinyClassifier", "+model.classes=4"]):
        network = explained_model(config("explain", tmp_path, f"checkpoint={path}", *overrides))
        assert type(network).__name__ == "TinyClassifier"


def test_a_checkpoint_of_another_task_or_class_count_is_a_one_line_error(tmp_path, recognizer):
    faces = save_module(recognizer, tmp_path / "faces.ckpt")
    with pytest.raises(ConfigError) as refused:
        explain(config("explain", tmp_path, f"checkpoint={faces}", "limit=2"))
    message = str(refused.value)
    assert message.startswith(f"{faces} holds a FaceRecognizer (face recognition; backbone arch small")
    assert "the module to load is fame.lightning.classifier.ImageClassifier, which needs model" in message
    assert "\n" not in message and not (tmp_path / "explain").exists()
    six = save_module(ImageClassifier(model={**SMALL_CNN, "num_classes": 6}), tmp_path / "six.ckpt")
    with pytest.raises(ConfigError, match=r"holds a classifier of 6 classes, but the data has data.num_classes=4"):
        explain(config("explain", tmp_path, f"checkpoint={six}", "limit=2"))
    assert not (tmp_path / "explain").exists()


def test_a_resumed_run_does_not_build_what_its_saved_config_names(tmp_path):
    quick = (
        "limit=32",
        "trainer.max_epochs=1",
        "data.datamodule.batch_size=16",
        "trainer.enable_progress_bar=false",
        "logger.enabled=false",
    )
    train(config("train", tmp_path, *quick))
    (run_dir,) = (tmp_path / "shapes" / "train" / "runs").iterdir()
    (run_dir / "FINISHED").unlink()
    created = tmp_path / "created.txt"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["module"]["model"] = saved["model"] = {**SMALL_CNN, "dropout": writes(created)}
    saved["data"]["datamodule"]["train"]["seed"] = writes(created)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    train(config("train", tmp_path, *quick))
    assert (run_dir / "FINISHED").exists() and not created.exists()
