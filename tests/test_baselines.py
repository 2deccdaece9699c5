"""Baselines: Grad-CAM through pytorch_grad_cam against its definition, and the model-free floors."""

import cv2
import numpy as np
import pytest
import torch
from nets import TinyClassifier

from fame.explain.baselines import cam_maps, centre_gaussian_maps, random_maps, sample_seed, sobel_maps


def literal_gradcam(model, layer, image, target):
    """Selvaraju et al.: ReLU(sum_c mean(dz/dA_c) A_c); grad-cam min-max scales it, resizes it
    bilinearly to the input size and min-max scales the result once more."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.update(a=o))
    model.eval()
    logits = model(image.unsqueeze(0))
    handle.remove()
    (gradient,) = torch.autograd.grad(logits[0, target], store["a"])
    weights = gradient[0].mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * store["a"][0]).sum(0)).detach().numpy()
    cam = cam - cam.min()
    cam = cam / (1e-7 + cam.max())
    cam = cv2.resize(np.float32(cam), (image.shape[2], image.shape[1]))
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


def test_gradcam_matches_definition_and_leaves_model_alone():
    model = TinyClassifier().train()
    layer = model.features[3]
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        maps = cam_maps(model, layer, images, torch.tensor([0, 2, 4]))
    assert maps.shape == (3, 1, 16, 16)
    for b, target in enumerate([0, 2, 4]):
        model_copy = TinyClassifier()
        expected = literal_gradcam(model_copy, model_copy.features[3], images[b], target)
        np.testing.assert_allclose(maps[b, 0].numpy(), expected, atol=1e-5)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("method", ["gradcam_elementwise", "hirescam", "fullgrad"])
def test_other_cam_methods_run(method):
    model = TinyClassifier()
    maps = cam_maps(model, model.features[3], torch.rand(2, 3, 16, 16), [1, 3], method)
    assert maps.shape == (2, 1, 16, 16) and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_cam_errors():
    model = TinyClassifier()
    with pytest.raises(ValueError, match="unknown CAM method"):
        cam_maps(model, model.features[3], torch.rand(1, 3, 8, 8), [0], "scorecam2")
    with pytest.raises(ValueError, match=r"one entry per image \(2\)"):
        cam_maps(model, model.features[3], torch.rand(2, 3, 8, 8), [0])


def test_floors():
    images = torch.rand(2, 3, 9, 11)
    centre = centre_gaussian_maps(images)
    assert centre.shape == (2, 1, 9, 11) and centre[0, 0, 4, 5] == centre.max()
    step = torch.zeros(1, 3, 6, 6)
    step[..., 3:] = 1.0
    edges = sobel_maps(step)
    assert edges[0, 0, :, 2:4].min() > 0.99 and edges[0, 0, :, :1].max() == 0 and edges[0, 0, :, 5:].max() < 1e-6


def test_random_maps_are_seeded_per_sample_id():
    images = torch.rand(4, 3, 6, 7)
    ids = ["img/0001.jpg", "img/0002.jpg", "img/0003.jpg", "img/0004.jpg"]
    whole = random_maps(images, ids, seed=7)
    torch.testing.assert_close(random_maps(images, ids, seed=7), whole, rtol=0, atol=0)
    # Another batch size, another order, a resumed run that only computes the last two: same maps.
    reordered = random_maps(images[[3, 1, 0, 2]], [ids[3], ids[1], ids[0], ids[2]], seed=7)
    torch.testing.assert_close(reordered, whole[[3, 1, 0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(random_maps(images[2:], ids[2:], seed=7), whole[2:], rtol=0, atol=0)
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(random_maps(images, ids, seed=8), whole)
    # The seed is crc32("<seed>:<id>"), the same in every process and on every machine.
    assert sample_seed("img/0001.jpg", 7) == 782219301
    with pytest.raises(ValueError, match=r"one sample id per image \(4\), got 3"):
        random_maps(images, ids[:3])


def test_scorecam_draws_no_progress_bars(capfd):
    from pytorch_grad_cam import score_cam

    library_tqdm = score_cam.tqdm
    model = TinyClassifier()
    maps = cam_maps(model, model.features[3], torch.rand(2, 3, 8, 8), [0, 1], "scorecam", batch_size=3)
    assert maps.shape == (2, 1, 8, 8) and torch.isfinite(maps).all()
    assert capfd.readouterr().err == "" and score_cam.tqdm is library_tqdm
