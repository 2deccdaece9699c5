"""Deletion / insertion and the sanity check under the published protocols, against transcriptions
of the reference definitions: RISE's CausalMetric (Petsiuk et al. 2018) and the layer
re-initialisation of Adebayo et al. 2018 / Quantus."""

import numpy as np
import pytest
import torch
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

from literal_baselines import literal_causal_metric, literal_rise_gkern
from nets import TinyClassifier


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
    assert (ours - deletion_curve(model, images, maps, targets, levels, "deletion", substrate="rise", mean=mean)).abs().max() > 1e-3


def test_rise_blur_in_pixels_is_the_zero_padded_blur_of_the_normalized_image():
    mean, std = torch.tensor([0.3, 0.5, 0.7]).view(1, 3, 1, 1).double(), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1).double()
    images = torch.rand(2, 3, 13, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    literal = torch.nn.functional.conv2d((images - mean) / std, literal_rise_gkern(11, 5, 3), padding=5) * std + mean
    torch.testing.assert_close(rise_substrate_blur(images, mean.flatten()), literal, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="substrate must be one of fame, rise, got 'grey'"):
        deletion_curve(nn.Identity(), images, images[:, :1], torch.zeros(2, dtype=torch.long), substrate="grey")
