"""The task objects: the one place that tells classification and verification apart, and a new task
as one subclass plus its registered methods."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from fame import tasks
from fame.config import ConfigError
from fame.explain import registry
from fame.explain.registry import MethodResult, register_method
from fame.stages.explain import method_identity
from fame.tasks import ClassificationTask, Task, explained_inputs, explainer, sample_task, task_of

PACKAGE = Path(__file__).resolve().parents[1] / "fame"
TASK_NAMES = ("classification", "verification")


class Counting(Task):
    """A third task: images with a count of objects, one map per image."""

    name = "counting"
    sample_keys = ("image", "count")
    image_key = "image"
    outputs = ("",)
    input_space_error = "input_space=normalized is not defined for counts"

    def batch_method(self, method, target, input_space):
        def compute(model, batch):
            counts = torch.as_tensor(batch["count"], device=batch["image"].device)
            return method(model, batch["image"], counts, ids=list(batch["id"]))

        return compute


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    task = tasks.register_task(Counting())

    @register_method("brightness", "counting")
    def brightness(model, images, counts, *, ids, gain: float = 1.0):
        maps = (gain * images.mean(dim=1, keepdim=True) * counts.view(-1, 1, 1, 1)).clamp(0, 1)
        return MethodResult({"": maps})

    return task


def test_a_third_task_is_one_subclass_and_runs_through_the_method_calling_path(counting):
    assert task_of("counting") is counting and "counting" in tasks.task_names()
    assert counting.method_names() == ["brightness"]
    method = counting.build_method(
        {"_target_": "fame.tasks.explainer", "name": "brightness", "gain": 2.0}, "explainer.brightness"
    )
    batch = {"image": torch.full((2, 3, 4, 4), 0.25), "count": [1, 0], "id": ["a", "b"]}
    result = counting.batch_method(method, "label", "pixels")(None, batch)
    torch.testing.assert_close(result.maps[""][:, 0, 0, 0], torch.tensor([0.5, 0.0]))
    assert sample_task({"image": 0, "count": 3, "id": "x"}, "sample x") is counting
    with pytest.raises(ConfigError, match="input_space=normalized is not defined for counts"):
        counting.check_input_space("normalized")


def test_task_of_names_the_known_tasks_and_samples_name_their_expected_keys():
    assert [task_of(name).name for name in TASK_NAMES] == list(TASK_NAMES)
    with pytest.raises(ConfigError, match="unknown task 'detection'; known: classification, verification"):
        task_of("detection")
    with pytest.raises(
        KeyError,
        match=r"sample 7 has keys \['id', 'x'\]; expected image and label \(classification\) "
        r"or gallery, probe and same \(verification\)",
    ):
        sample_task({"x": 1, "id": 7}, "sample 7")
    assert sample_task({"gallery": 0, "probe": 0, "same": True}, "pair").outputs == (
        "probe.similar",
        "probe.dissimilar",
        "gallery.similar",
        "gallery.dissimilar",
    )


def test_the_explainer_target_binds_options_and_refuses_unknown_ones_word_for_word():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.rand(2, 3, 8, 8)
    bound = explainer("random", "classification", seed=3)
    direct = task_of("classification").method("random")(model, images, [0, 1], ids=["a", "b"], seed=3)
    torch.testing.assert_close(bound(model, images, [0, 1], ids=["a", "b"]).maps[""], direct.maps[""])
    with pytest.raises(
        ValueError,
        match=r"rise \(classification\) has no option 'mask'; its options are masks, "
        r"grid_size",
    ):
        explainer("rise", "classification", mask=3)
    with pytest.raises(ValueError, match="unknown verification method 'rise'; known verification methods: centre"):
        explainer("rise", "verification")


def test_a_method_identity_leaves_out_how_the_method_is_built():
    options = {"name": "random", "seed": 0}
    built = {"_target_": "fame.tasks.explainer", **options}
    assert method_identity(built, "explainer.random") == method_identity(options, "explainer.random") == options


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Identity()

    def normalize(self, images):
        return (images - 0.5) / 0.25


def test_the_input_space_swap_is_the_normalized_tensor_and_the_wrapped_network():
    model, images = Wrapped(), torch.full((1, 3, 2, 2), 0.75)
    inputs, network = explained_inputs(model, images, "normalized")
    assert network is model.net and torch.equal(inputs, torch.ones(1, 3, 2, 2))
    assert explained_inputs(model, images, "pixels") == (images, model)
    with pytest.raises(ConfigError, match="face models normalize inside"):
        task_of("verification").check_input_space("normalized")
    ClassificationTask().check_input_space("normalized")


def _task_name_comparisons(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                if isinstance(operand, ast.Constant) and operand.value in TASK_NAMES:
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def test_no_module_outside_the_task_module_compares_a_task_name():
    modules = [path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "tasks.py"]
    entry_points = sorted(PACKAGE.parent.glob("*.py"))
    assert len(modules) > 40 and entry_points
    found = [place for path in modules + entry_points for place in _task_name_comparisons(path)]
    assert found == []
    assert list(_task_name_comparisons(PACKAGE / "tasks.py"))  # the check sees the comparisons that are allowed


STAGES = ("evaluate", "explain", "featuremap", "train")


def test_no_stage_imports_another():
    for stage in STAGES:
        tree = ast.parse((PACKAGE / "stages" / f"{stage}.py").read_text())
        imported = {
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
        }
        imported |= {
            f"{node.module}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fame.stages.")
        }
        assert not {name.split(".")[-1] for name in imported} & set(STAGES), stage
