"""Deletion / insertion and the sanity check under the published protocols, against transcriptions
of the reference definitions: RISE's CausalMetric (Petsiuk et al. 2018) and the layer
re-initialisation of Adebayo et al. 2018 / Quantus."""

import copy
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from literal_baselines import literal_causal_metric, literal_reinitialize, literal_rise_gkern
from nets import TinyClassifier
from scipy.ndimage import gaussian_filter
from torch import nn

from fame.metrics.faithfulness import (
    curve_auc,
    deletion_curve,
    pixel_ranks,
    rise_fractions,
    rise_kernel,
    rise_substrate_blur,
)
from fame.metrics.sanity import cascading_randomization, reinitialization_seed


class NormalizingClassifier(nn.Module):
    """[0, 1] pixels in, ``net((x - mean) / std)`` out, like fame.models.Classifier."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1))

    def forward(self, images):
        return self.net((images - self.mean) / self.std)


def test_rise_kernel_is_scipy_gaussian_filter_of_an_impulse():
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    np.testing.assert_allclose(rise_kernel().numpy(), gaussian_filter(impulse, 5), rtol=0, atol=1e-15)
    assert abs(float(rise_kernel().sum()) - 1) < 1e-12


def test_rise_fractions_are_one_row_per_step():
    assert len(rise_fractions(224, 224)) == 225
    assert rise_fractions(3, 4) == (0.0, 4 / 12, 8 / 12, 1.0)
    assert rise_fractions(2, 3, step=4) == (0.0, 4 / 6, 1.0)  # the last step takes what is left


def test_reversed_ties_are_the_flip_of_an_ascending_stable_sort():
    maps = torch.tensor([[[[0.5, 0.9], [0.5, 0.1]]]])
    assert pixel_ranks(maps).flatten().tolist() == [1, 0, 2, 3]  # ours: the tie at 0.5 in raster order
    assert pixel_ranks(maps, ties_reversed=True).flatten().tolist() == [2, 0, 1, 3]  # RISE: reversed


@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_rise_protocol_equals_literal_causal_metric(size):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    net = TinyClassifier(classes=4, seed=3).double().eval()
    model = NormalizingClassifier(net, mean, std).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, *size, generator=generator, dtype=torch.float64)
    # maps with many ties (four values) and one constant map
    maps = torch.randint(0, 4, (3, 1, *size), generator=generator).double() / 3
    maps[2] = 0.25
    with torch.no_grad():
        targets = model(images).argmax(dim=1)  # RISE explains the top-1 class
    levels = rise_fractions(*size)
    for mode, literal_mode in (("deletion", "del"), ("insertion", "ins")):
        curve = deletion_curve(model, images, maps, targets, levels, mode, substrate="rise", mean=mean, batch_size=7)
        aucs = curve_auc(curve.double(), levels)
        for b in range(images.shape[0]):
            normalized = (images[b : b + 1] - model.mean) / model.std
            scores, auc = literal_causal_metric(net, normalized, maps[b, 0].numpy(), literal_mode, step=size[1])
            assert len(scores) == size[0] + 1
            np.testing.assert_allclose(curve[b].double().numpy(), scores, rtol=0, atol=1e-6)
            assert abs(float(aucs[b]) - auc) < 1e-6
    # the protocols differ: black vs the mean colour
    ours = deletion_curve(model, images, maps, targets, levels, "deletion")
    assert (
        ours - deletion_curve(model, images, maps, targets, levels, "deletion", substrate="rise", mean=mean)
    ).abs().max() > 1e-3


def test_rise_blur_in_pixels_is_the_zero_padded_blur_of_the_normalized_image():
    mean, std = (
        torch.tensor([0.3, 0.5, 0.7]).view(1, 3, 1, 1).double(),
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1).double(),
    )
    images = torch.rand(2, 3, 13, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    literal = torch.nn.functional.conv2d((images - mean) / std, literal_rise_gkern(11, 5, 3), padding=5) * std + mean
    torch.testing.assert_close(rise_substrate_blur(images, mean.flatten()), literal, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="substrate must be one of fame, rise, got 'grey'"):
        deletion_curve(nn.Identity(), images, images[:, :1], torch.zeros(2, dtype=torch.long), substrate="grey")


class Wrapper(nn.Module):
    """Like fame.models.Classifier: every parameter in one child ``net``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        return self.net(images)


def block_model():
    """conv -> BN (trained statistics) -> ReLU -> conv -> pool -> linear, wrapped like fame.models.Classifier."""
    torch.manual_seed(1)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        body[1].running_mean.uniform_(-0.5, 0.5)
        body[1].running_var.uniform_(0.5, 2.0)
        body[1].num_batches_tracked.fill_(100)
        body[1].weight.uniform_(0.5, 1.5)
    net = nn.Sequential(
        OrderedDict(body=body, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(4, 3))
    )
    return Wrapper(net).eval()


def test_reinit_cascade_equals_reset_parameters_under_the_drawn_seeds():
    model = block_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    states = []

    def recording_map(network, images, targets):  # the weights and statistics each map is computed with
        states.append({name: value.clone() for name, value in network.state_dict().items()})
        return images.mean(dim=1, keepdim=True)

    global_state = torch.random.get_rng_state()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cascading_randomization(
        model,
        recording_map,
        images,
        torch.tensor([0, 1]),
        torch.Generator().manual_seed(7),
        layers=["net.head", "net.body"],
    )
    assert torch.random.get_rng_state().equal(global_state)  # the caller's global random state is kept
    for name, value in model.state_dict().items():
        assert value.equal(before[name]), f"{name} of the caller's model changed"

    # the definition: one seed per step from the same generator, reset_parameters() of each module
    generator = torch.Generator().manual_seed(7)
    expected = copy.deepcopy(model)
    intact, *steps = states
    assert all(value.equal(before[name]) for name, value in intact.items())
    for state, layer in zip(steps, ["net.head", "net.body"]):
        literal_reinitialize(expected.get_submodule(layer), reinitialization_seed(generator))
        for name, value in expected.state_dict().items():
            assert state[name].equal(value), f"{name} after re-initialising {layer}"
    head_step, body_step = steps
    for name, value in head_step.items():  # step 1 leaves everything outside the head as it was
        assert value.equal(before[name]) != name.startswith("net.head."), name
    assert not body_step["net.body.0.weight"].equal(before["net.body.0.weight"])
    assert body_step["net.body.1.running_mean"].eq(0).all() and body_step["net.body.1.running_var"].eq(1).all()
    assert int(body_step["net.body.1.num_batches_tracked"]) == 0
    assert body_step["net.body.1.weight"].eq(1).all() and body_step["net.body.1.bias"].eq(0).all()


def test_reinit_is_seeded_and_differs_from_redraw():
    model = block_model()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def run(randomization, seed):  # the weights and statistics after the last step
        states = []

        def recording_map(network, images, targets):
            states.append({name: value.clone() for name, value in network.state_dict().items()})
            return images.mean(dim=1, keepdim=True)

        cascading_randomization(
            model,
            recording_map,
            images,
            torch.tensor([0, 1]),
            torch.Generator().manual_seed(seed),
            layers=["net.head", "net.body"],
            randomization=randomization,
        )
        return states[-1]

    first, again, other_seed, redrawn = run("reinit", 5), run("reinit", 5), run("reinit", 6), run("redraw", 5)
    assert all(first[name].equal(again[name]) for name in first)
    assert not first["net.body.0.weight"].equal(other_seed["net.body.0.weight"])
    assert not first["net.body.0.weight"].equal(redrawn["net.body.0.weight"])
    assert redrawn["net.body.1.running_var"].equal(
        model.state_dict()["net.body.1.running_var"]
    )  # redraw keeps statistics
    with pytest.raises(ValueError, match="randomization must be one of reinit, redraw, got 'shuffle'"):
        cascading_randomization(
            model,
            lambda network, images, targets: images[:, :1],
            images,
            torch.tensor([0, 1]),
            torch.Generator(),
            randomization="shuffle",
        )


def test_explain_refuses_an_unknown_fggb_gradient_before_building(tmp_path):
    from hydra import compose, initialize_config_dir

    from fame.config import ConfigError
    from fame.stages.explain import check_explain_config

    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        config = compose(
            config_name="explain",
            overrides=[
                f"paths.output_dir={tmp_path}",
                "experiment=faces",
                "checkpoint=null",
                "explainer.fggb.gradient_of=unit",
            ],
        )
    with pytest.raises(
        ConfigError, match="'explainer.fggb.gradient_of' has the value 'unit'; allowed: one of 'normalized', 'raw'"
    ):
        check_explain_config(config)
