"""Target layers: EfficientNet-Lite's, unknown networks, modules that run twice, names in either input space."""

from __future__ import annotations

import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from fame import FameConfig, explain_feature_map
from fame.explain import get_method
from fame.explain.baselines import cam_maps
from fame.explain.objectives import resolve_layer
from fame.models import build_classifier, target_layer

SMALL = dict(iterations=2, blur_kernel=3, blur_sigma=1.0)


@pytest.fixture(scope="module")
def lite0():
    return build_classifier("efficientnet_lite0")


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_classifier("resnet18", None)


def test_efficientnet_lite_target_layer_is_its_7x7_head_and_gradcam_runs_there(lite0) -> None:
    layer = target_layer(lite0)
    assert layer is lite0.net.bn2 and target_layer(lite0.net) is layer
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output.shape))
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        lite0(images)
    handle.remove()
    assert captured == [(2, 1280, 7, 7)]
    maps = cam_maps(lite0, layer, images, [281, 967])
    assert maps.shape == (2, 1, 224, 224) and float(maps.amax()) > 0


def test_an_unknown_network_is_told_how_to_name_its_layer_and_build_classifier_takes_one(resnet18) -> None:
    with pytest.raises(ValueError, match=r"explainer\.<method>\.layer=<name>.*model\.target_layer=<name>"):
        target_layer(nn.Sequential(nn.Conv2d(3, 4, 3)))
    named = build_classifier("resnet18", None, target_layer="net.layer3")
    assert target_layer(named) is named.net.layer3 and target_layer(named.net) is named.net.layer3
    assert build_classifier("resnet18", None, target_layer="layer3").net.target_layer_name == "layer3"
    with pytest.raises(ValueError, match="no submodule named 'layer5'.*close names: layer4"):
        build_classifier("resnet18", None, target_layer="layer5")


def test_a_module_that_runs_twice_per_forward_pass_is_refused_by_name() -> None:
    reference = EfficientNet.from_name("efficientnet-lite0").eval()  # its _swish serves the stem and the head
    images = torch.rand(1, 3, 224, 224)
    with pytest.raises(ValueError, match=r"'_swish' \(ReLU6\) runs 2 times in one forward pass"):
        cam_maps(reference, reference._swish, images, [0])
    with pytest.raises(ValueError, match=r"'_swish' \(ReLU6\) runs 2 times"):
        explain_feature_map(reference, "_swish", images, config=FameConfig(**SMALL))
    with pytest.raises(ValueError, match=r"'_blocks.3._swish' \(ReLU6\) runs 2 times"):
        explain_feature_map(reference, reference._blocks[3]._swish, images, config=FameConfig(**SMALL))
    assert all(not module._forward_hooks for module in reference.modules())
    maps = explain_feature_map(reference, "_bn1", images, [(3, 3)], config=FameConfig(**SMALL))
    assert maps.shape == (1, 1, 224, 224)


def test_a_layer_name_means_the_same_module_in_either_input_space(resnet18) -> None:
    layer = resnet18.net.layer4
    for model in (resnet18, resnet18.net):
        for name in ("layer4", "net.layer4"):
            assert resolve_layer(model, name) is layer
    gradcam = get_method("gradcam", "classification")
    images, targets = torch.rand(2, 3, 64, 64), torch.tensor([3, 7])
    in_pixels = gradcam(resnet18, images, targets, ids=["a", "b"], layer="layer4").maps[""]
    normalized = gradcam(resnet18.net, resnet18.normalize(images), targets, ids=["a", "b"], layer="net.layer4").maps[""]
    assert torch.allclose(in_pixels, normalized, atol=1e-5)


def test_a_wrong_layer_name_fails_before_any_map_listing_close_names(resnet18) -> None:
    for model in (resnet18, resnet18.net):
        with pytest.raises(ValueError, match="no submodule named 'net.layr4'.*close names: .*layer4"):
            get_method("gradcam", "classification")(model, torch.rand(1, 3, 64, 64), [0], ids=["a"], layer="net.layr4")
        with pytest.raises(ValueError, match="no submodule named 'layer4.3'.*close names: .*layer4.1"):
            explain_feature_map(model, "layer4.3", torch.rand(1, 3, 64, 64), config=FameConfig(iterations=500))
