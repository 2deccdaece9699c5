"""EfficientNet-Lite0 from the package index: equal to the reference package's network on real photos."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet

from fame.data.photos import DEFAULT_ANNOTATIONS, PhotoDataset, read_photo_annotations
from fame.models import build_classifier, classifier_names, efficientnet_lite
from fame.models.efficientnet_lite import EFFICIENTNET_LITE, weights_file


@pytest.fixture(scope="module")
def lite0():
    return build_classifier("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos() -> list[dict]:
    """Every photo of data/photos at the reference package's preprocessing (PIL resize to 224, square)."""
    dataset = PhotoDataset()
    return [dataset[index] for index in range(len(dataset))]


def test_logits_equal_the_reference_package_and_top1_is_plainly_right(lite0, photos) -> None:
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_file("efficientnet_lite0")))
    images = torch.stack([photo["image"] for photo in photos])
    with torch.no_grad():
        ours = lite0(images)
        theirs = reference.eval()(lite0.normalize(images))
    assert images.shape == (6, 3, 224, 224)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-4), (ours - theirs).abs().max()
    accepted = {record["id"]: record["accepted"] for record in read_photo_annotations(DEFAULT_ANNOTATIONS)}
    top1 = {photo["id"]: int(index) for photo, index in zip(photos, ours.argmax(1))}
    assert {name: lite0.categories[index] for name, index in top1.items() if index not in accepted[name]} == {}


def test_the_network_is_timms_graph_with_the_reference_preprocessing(lite0) -> None:
    assert type(lite0.net).__module__.startswith("timm.")
    assert (lite0.preprocess.resize_size, lite0.preprocess.crop_size) == (224, 224)
    assert lite0.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert lite0.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert len(lite0.categories) == 1000 and not lite0.training
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(classifier_names())


def test_a_saved_state_dict_loads_back_strictly_and_a_new_head_size_needs_weights_none(lite0, tmp_path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(lite0.net.state_dict(), path)
    again = build_classifier("efficientnet_lite0", path)
    for key, value in lite0.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[key], value), key
    with pytest.raises(ValueError, match="num_classes=10"):
        build_classifier("efficientnet_lite0", num_classes=10)
    assert build_classifier("efficientnet_lite0", None, num_classes=10)(torch.rand(1, 3, 224, 224)).shape == (1, 10)


def test_a_missing_weight_package_or_file_names_the_package_and_the_file(monkeypatch, tmp_path) -> None:
    variant = EFFICIENTNET_LITE["efficientnet_lite0"]
    absent = dataclasses.replace(variant, package="fame_no_such_lite")
    monkeypatch.setitem(EFFICIENTNET_LITE, "efficientnet_lite0", absent)
    with pytest.raises(FileNotFoundError, match="fame-no-such-lite.*not installed") as error:
        build_classifier("efficientnet_lite0")
    assert variant.weights_file in str(error.value)

    (tmp_path / "fame_empty_lite" / "models").mkdir(parents=True)
    (tmp_path / "fame_empty_lite" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    empty = dataclasses.replace(variant, package="fame_empty_lite")
    monkeypatch.setitem(EFFICIENTNET_LITE, "efficientnet_lite0", empty)
    with pytest.raises(FileNotFoundError, match="fame-empty-lite.*lacks its weight file") as error:
        efficientnet_lite.weights_file("efficientnet_lite0")
    assert variant.weights_file in str(error.value)


def test_the_key_renaming_refuses_a_key_it_does_not_know(lite0) -> None:
    reference = torch.load(weights_file("efficientnet_lite0"), weights_only=True)
    reference["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="_se_reduce"):
        efficientnet_lite.timm_keys_from_reference(reference, lite0.net)
