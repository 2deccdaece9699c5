"""The method registry: every registered method on tiny models, the CAM cosine target by hand,
target layers of face models, errors and plugging in a new method."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nets import TinyClassifier, TinyEmbedder

from fame.explain import FameStats, registry
from fame.explain.baselines import CosineSimilarityTarget
from fame.explain.registry import MethodResult, get_method, layer_of, method_names, register_method
from fame.models import build_face_model

CAMS = ["fullgrad", "gradcam", "gradcam_elementwise", "hirescam", "scorecam"]
FAME_OPTIONS = dict(iterations=3, blur_kernel=3, blur_sigma=1.0)
CLASSIFICATION_OPTIONS = {
    "fame": FAME_OPTIONS,
    "rise": dict(masks=8, grid_size=3),
    **{cam: dict(layer="features.3") for cam in CAMS if cam != "fullgrad"},
}
VERIFICATION_OPTIONS = {
    "fame": FAME_OPTIONS,
    "corrrise": dict(masks=10, patch_size=3),
    "fggb": dict(blur_kernel=3, blur_sigma=1.0),
    **{cam: dict(layer="body.2") for cam in CAMS if cam != "fullgrad"},
}


def test_the_contracted_methods_are_registered():
    assert method_names("classification") == sorted(
        [
            "fame",
            "gradcam",
            "gradcam_elementwise",
            "hirescam",
            "fullgrad",
            "scorecam",
            "rise",
            "random",
            "centre",
            "sobel",
        ]
    )
    assert method_names("verification") == sorted(
        [
            "fame",
            "gradcam",
            "gradcam_elementwise",
            "hirescam",
            "fullgrad",
            "scorecam",
            "corrrise",
            "fggb",
            "random",
            "centre",
            "sobel",
        ]
    )
    assert get_method("fggb", "verification").options == [
        "threshold",
        "blur_kernel",
        "blur_sigma",
        "normalization",
        "batch_size",
        "gradient_of",
    ]
    assert get_method("fullgrad", "classification").options == [] and get_method("gradcam", "verification").options == [
        "layer"
    ]


def snapshot(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [p.detach().clone() for p in model.parameters()],
    )


def prepare(model):
    """Train mode, one frozen parameter and one with a gradient: all of it must survive."""
    model.train()
    parameters = list(model.parameters())
    parameters[0].requires_grad_(False)
    parameters[-1].grad = torch.full_like(parameters[-1], 0.5)
    return model


def check_left_alone(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(a is b for a, b in zip(after[2], before[2]))
    assert all(torch.equal(a, b) for a, b in zip(after[3], before[3]))
    assert all(len(m._forward_hooks) == 0 and len(m._backward_hooks) == 0 for m in model.modules())


def check_maps(result, keys, shape):
    assert isinstance(result, MethodResult) and sorted(result.maps) == sorted(keys)
    for maps in result.maps.values():
        assert maps.shape == shape and maps.dtype == torch.float32
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


@pytest.mark.parametrize("name", method_names("classification"))
def test_every_classification_method_runs_and_leaves_the_model_alone(name):
    model = prepare(TinyClassifier())
    before = snapshot(model)
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        result = get_method(name, "classification")(
            model, images, torch.tensor([1, 3]), ids=["a", "b"], **CLASSIFICATION_OPTIONS.get(name, {})
        )
    check_maps(result, [""], (2, 1, 12, 12))
    if name == "fame":
        assert isinstance(result.stats[""], FameStats) and result.stats[""].iterations.tolist() == [3, 3]
    check_left_alone(model, before)


@pytest.mark.parametrize("name", method_names("verification"))
def test_every_verification_method_runs_and_leaves_the_model_alone(name):
    model = prepare(TinyEmbedder(size=12))
    before = snapshot(model)
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    references = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        result = get_method(name, "verification")(
            model, images, references, ids=["p0", "p1"], **VERIFICATION_OPTIONS.get(name, {})
        )
    check_maps(result, ["similar", "dissimilar"], (2, 1, 12, 12))
    if name == "fame":
        assert sorted(result.stats) == ["dissimilar", "similar"]
    check_left_alone(model, before)


def literal_cosine_gradcam(model, layer, image, reference, dissimilar):
    """Selvaraju et al. with s = cos(phi(x), phi_ref) (or 1 - s): ReLU(sum_c mean(ds/dA_c) A_c),
    min-max scaled, resized bilinearly (cv2) and min-max scaled again, as grad-cam does."""
    model.eval()
    frozen = model(reference.unsqueeze(0)).detach()[0]
    captured = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.update(a=output))
    embedding = model(image.unsqueeze(0))[0]
    handle.remove()
    similarity = torch.dot(embedding, frozen) / (embedding.norm() * frozen.norm())
    (gradient,) = torch.autograd.grad(1 - similarity if dissimilar else similarity, captured["a"])
    weights = gradient[0].mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * captured["a"][0]).sum(0)).detach().numpy()
    cam = (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())
    cam = cv2.resize(np.float32(cam), (image.shape[2], image.shape[1]))
    return (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())


def test_cam_cosine_target_equals_hand_computation():
    model = TinyEmbedder(size=12)
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    references = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    target = CosineSimilarityTarget(model(references[:1])[0].detach())
    embedding = model(images[:1])[0]
    torch.testing.assert_close(target(embedding), F.cosine_similarity(embedding, model(references[:1])[0], dim=0))
    result = get_method("gradcam", "verification")(model, images, references, ids=["a", "b"], layer="body.2")
    for b in range(2):
        for key, dissimilar in (("similar", False), ("dissimilar", True)):
            fresh = TinyEmbedder(size=12)
            expected = literal_cosine_gradcam(fresh, fresh.body[2], images[b], references[b], dissimilar)
            np.testing.assert_allclose(result.maps[key][b, 0].numpy(), expected, atol=1e-5)


def test_face_models_use_the_last_block_of_the_body():
    embedder = build_face_model("small", input_size=32)
    assert layer_of(embedder, None) is embedder.net.layer4[-1]
    assert layer_of(embedder, "net.layer3") is embedder.net.layer3
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    result = get_method("gradcam", "verification")(embedder, images, images.flip(0), ids=["a", "b"])
    check_maps(result, ["similar", "dissimilar"], (2, 1, 32, 32))


def test_random_floor_depends_on_the_id_only():
    images = torch.rand(3, 3, 8, 8)
    method = get_method("random", "verification")
    whole = method(None, images, images, ids=["x", "y", "z"])
    part = method(None, images[1:], images[1:], ids=["y", "z"])
    torch.testing.assert_close(whole.maps["similar"][1:], part.maps["similar"])
    assert not torch.equal(whole.maps["similar"], whole.maps["dissimilar"])
    assert not torch.equal(
        whole.maps["similar"], method(None, images, images, ids=["x", "y", "z"], seed=1).maps["similar"]
    )


def test_errors_name_what_is_known():
    model = TinyClassifier()
    images = torch.rand(1, 3, 8, 8)
    with pytest.raises(
        ValueError, match="unknown classification method 'corrrise'; known classification methods: centre, fame"
    ):
        get_method("corrrise", "classification")
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        method_names("detection")
    with pytest.raises(
        ValueError, match=r"rise \(classification\) has no option 'mask'; its options are masks, grid_size"
    ):
        get_method("rise", "classification")(model, images, [0], ids=["a"], mask=3)
    with pytest.raises(
        ValueError, match=r"fame \(classification\) has no option 'iteration'; its options are loss, step_size"
    ):
        get_method("fame", "classification")(model, images, [0], ids=["a"], iteration=3)
    with pytest.raises(ValueError, match=r"ids must hold one sample id per image \(1\), got 2"):
        get_method("sobel", "classification")(model, images, [0], ids=["a", "b"])
    with pytest.raises(ValueError, match="the model has no submodule named 'layer9'"):
        get_method("gradcam", "classification")(model, images, [0], ids=["a"], layer="layer9")


def test_a_new_method_plugs_in_with_one_function(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @register_method("brightness", "classification")
    def brightness(model, images, targets, *, ids, gain=1.0):
        return MethodResult({"": (gain * images.mean(dim=1, keepdim=True)).clamp(0, 1)})

    assert "brightness" in method_names("classification") and "brightness" not in method_names("verification")
    result = get_method("brightness", "classification")(None, torch.full((1, 3, 4, 4), 0.25), [0], ids=["a"], gain=2.0)
    torch.testing.assert_close(result.maps[""], torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="already registered"):
        register_method("brightness", "classification")(brightness)
    bad = register_method("nan_method", "classification")(
        lambda model, images, targets, *, ids: MethodResult({"": images[:, :1] * float("nan")})
    )
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        get_method("nan_method", "classification")(None, torch.rand(1, 3, 4, 4), [0], ids=["a"])
    assert bad is not None
    register_method("unscaled", "verification")(
        lambda model, images, other, *, ids: MethodResult({"similar": 255 * images[:, :1], "dissimilar": images[:, :1]})
    )
    with pytest.raises(RuntimeError, match=r"unscaled returned 'similar' maps outside \[0, 1\]"):
        get_method("unscaled", "verification")(None, torch.rand(1, 3, 4, 4) + 0.5, None, ids=["a"])


@pytest.mark.parametrize("task", ["classification", "verification"])
def test_every_method_has_a_config_file_with_its_options(task):
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf

    from fame.explain import FameConfig

    folder = Path(__file__).parents[1] / "configs" / "explainer"
    for name in method_names(task):
        config = OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml"))
        assert config.pop("name") == name
        assert config.pop("_target_") == "fame.tasks.explainer"
        known = [f.name for f in fields(FameConfig)] + ["loss"] if name == "fame" else get_method(name, task).options
        assert set(config) <= set(known), (name, sorted(set(config) - set(known)))
        if name != "fame":
            assert sorted(config) == sorted(known), name  # every option visible in the file
