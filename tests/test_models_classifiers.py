"""torchvision classifiers by name: weights from the hub cache, weight files, preprocessing, target layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18

from fame.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    Preprocessing,
    SmallCNN,
    build_classifier,
    classifier_names,
    target_layer,
)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, and downloads that fail at once (a proxy on a closed local port)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path / "torch"


def test_default_weights_load_from_a_seeded_hub_cache(torch_home) -> None:
    torch.manual_seed(0)
    expected = resnet18().state_dict()
    cache = torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(expected, cache / "resnet18-f37072fd.pth")  # the basename of ResNet18_Weights.DEFAULT.url
    model = build_classifier("resnet18", "DEFAULT")
    assert isinstance(model, Classifier) and model.name == "resnet18"
    for key, value in expected.items():
        assert torch.equal(model.net.state_dict()[key], value), key
    assert model.categories == tuple(ResNet18_Weights.DEFAULT.meta["categories"]) and len(model.categories) == 1000
    assert model.preprocess == Preprocessing(256, 224)
    assert torch.allclose(model.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.std.flatten(), torch.tensor(IMAGENET_STD))


def test_missing_default_weights_name_the_file_and_folder(torch_home) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        build_classifier("resnet18", "IMAGENET1K_V1")
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(torch_home / "hub" / "checkpoints") in message


def test_forward_normalizes_inside() -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet18", None, num_classes=7)
    assert not model.training
    images = torch.rand(2, 3, 64, 64)
    normalized = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(images), normalized)
    with torch.no_grad():
        assert torch.equal(model(images), model.net(model.normalize(images)))
    assert model(images).shape == (2, 7)
    assert model.categories is None
    assert list(model.state_dict()) == ["net." + key for key in model.net.state_dict()]  # mean/std are not saved
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64))


def test_preprocessing_is_the_weights_transform_without_normalization() -> None:
    model = build_classifier("resnet50", None)
    assert (model.preprocess.resize_size, model.preprocess.crop_size) == (232, 224)
    image = torch.rand(3, 300, 400)
    resized = model.preprocess(image)
    assert resized.shape == (3, 224, 224)
    reference = ResNet50_Weights.DEFAULT.transforms()(image)
    assert torch.allclose(model.normalize(resized[None])[0], reference, atol=1e-5)


def test_weight_file_loads_strictly(tmp_path) -> None:
    torch.manual_seed(0)
    net = resnet18(num_classes=5)
    path = tmp_path / "finetuned.pth"
    torch.save({"module." + key: value for key, value in net.state_dict().items()}, path)
    model = build_classifier("resnet18", path, num_classes=5)
    assert torch.equal(model.net.fc.weight, net.fc.weight)
    assert model.preprocess == Preprocessing(256, 224)
    reference_script = tmp_path / "checkpoint.pth"  # torchvision's references/classification layout
    torch.save({"model": net.state_dict(), "epoch": 3}, reference_script)
    assert torch.equal(build_classifier("resnet18", reference_script, num_classes=5).net.conv1.weight, net.conv1.weight)


def test_weight_file_mismatches_are_explained(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "finetuned.pth"
    torch.save(resnet18(num_classes=5).state_dict(), path)
    with pytest.raises(ValueError) as caught:
        build_classifier("resnet18", path)
    message = str(caught.value)
    assert str(path) in message and "resnet18 with 1000 classes" in message
    assert "fc.weight (expected (1000, 512), file has (5, 512))" in message and "num_classes=" in message
    state = resnet18(num_classes=5).state_dict()
    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"1 missing key\(s\): layer1.0.conv1.weight"):
        build_classifier("resnet18", path, num_classes=5)


def test_bad_names_and_paths() -> None:
    with pytest.raises(ValueError, match="Did you mean resnet50"):
        build_classifier("resnet05")
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V1"):
        build_classifier("resnet18", "no/such/weights.pth")
    with pytest.raises(ValueError, match="1000 classes but num_classes=3"):
        build_classifier("resnet18", "DEFAULT", num_classes=3)
    assert {"resnet50", "vgg19", "convnext_tiny", "vit_b_16"} <= set(classifier_names())


@pytest.mark.parametrize(
    ("name", "layer_of"),
    [
        ("resnet18", lambda net: net.layer4[-1]),
        ("vgg11", lambda net: net.features[-2]),
        ("convnext_tiny", lambda net: net.features[-1][-1]),
        ("mobilenet_v3_small", lambda net: net.features[-1]),
        ("efficientnet_b0", lambda net: net.features[-1]),
        ("regnet_x_400mf", lambda net: net.trunk_output[-1]),
        ("densenet121", lambda net: net.features[-1]),
    ],
)
def test_target_layers_of_torchvision_families(name: str, layer_of) -> None:
    with torch.device(
        "cpu" if name.startswith("regnet") else "meta"
    ):  # meta: no weight init; RegNet needs real tensors
        model = build_classifier(name, None)
    assert target_layer(model) is layer_of(model.net)
    assert target_layer(model.net) is layer_of(model.net)


def test_target_layer_outputs_are_spatial() -> None:
    model = build_classifier("resnet18", None)
    captured = []
    handle = target_layer(model).register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        model(torch.rand(1, 3, 224, 224))
    handle.remove()
    assert captured[0].shape == (1, 512, 7, 7)


def test_target_layer_of_a_network_that_names_its_own() -> None:
    net = SmallCNN(num_classes=3)
    assert target_layer(net) is net.stages[-1]


def test_target_layer_unknown_family() -> None:
    with pytest.raises(ValueError, match="No target layer is known for Sequential"):
        target_layer(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with torch.device("meta"):
        vit = build_classifier("vit_b_16", None)
    with pytest.raises(ValueError, match="VisionTransformer.*reshape"):
        target_layer(vit)
