"""Agreement with Quantus on the localisation metrics both define (deliberate differences avoided:
non-negative maps without ties, non-empty masks, Quantus' normalisation off)."""

import numpy as np
import pytest
import torch

from fame.metrics.localization import (
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    top_k_intersection,
)

quantus = pytest.importorskip("quantus")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(8, 1, 12, 12, generator=generator)
    masks = torch.zeros(8, 1, 12, 12)
    for b in range(8):
        y, x = torch.randint(0, 8, (2,), generator=generator).tolist()
        masks[b, 0, y : y + 4, x : x + 3] = 1
    maps[:4] += 0.5 * masks[:4]  # some maps point at the mask
    images = torch.rand(8, 3, 12, 12, generator=generator)
    return images.numpy(), maps.numpy(), masks.numpy()


def run_quantus(metric, batch):
    images, maps, masks = batch
    return np.asarray(
        metric(model=None, x_batch=images, y_batch=np.zeros(len(images), dtype=int), a_batch=maps, s_batch=masks),
        dtype=float,
    )


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (pointing_game, lambda: quantus.PointingGame(normalise=False, disable_warnings=True)),
        (relevance_mass_accuracy, lambda: quantus.RelevanceMassAccuracy(normalise=False, disable_warnings=True)),
        (relevance_rank_accuracy, lambda: quantus.RelevanceRankAccuracy(normalise=False, disable_warnings=True)),
        (
            lambda maps, masks: top_k_intersection(maps, masks, 20),
            lambda: quantus.TopKIntersection(k=20, normalise=False, disable_warnings=True),
        ),
    ],
    ids=["pointing_game", "relevance_mass", "relevance_rank", "top_k_intersection"],
)
def test_agrees_with_quantus(batch, ours, theirs):
    _, maps, masks = batch
    expected = run_quantus(theirs(), batch)
    np.testing.assert_allclose(ours(torch.from_numpy(maps), torch.from_numpy(masks)).numpy(), expected, atol=1e-6)
