"""ROAD: the batched noisy linear imputation against direct sparse solves, and ROAD curves on toys."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve
from test_metrics_faithfulness import RegionSum, region_toy

from fame.metrics.faithfulness import pixel_ranks
from fame.metrics.road import noisy_linear_impute, road_curve, solve_linear_imputation

NEIGHBOURS = [
    ((dy, dx), 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
]


def direct_solve(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Each removed pixel the weighted mean of its in-image neighbours, solved with scipy's spsolve."""
    height, width = removed.shape
    unknown = np.flatnonzero(removed)
    index = -np.ones(height * width, dtype=int)
    index[unknown] = np.arange(unknown.size)
    rows, cols, vals = [], [], []
    rhs = np.zeros((unknown.size, image.shape[0]))
    for row, pixel in enumerate(unknown):
        y, x = divmod(pixel, width)
        total = 0.0
        for (dy, dx), weight in NEIGHBOURS:
            ny, nx = y + dy, x + dx
            if 0 <= ny < height and 0 <= nx < width:
                total += weight
                neighbour = ny * width + nx
                if removed[ny, nx]:
                    rows.append(row), cols.append(index[neighbour]), vals.append(-weight)
                else:
                    rhs[row] += weight * image[:, ny, nx]
        rows.append(row), cols.append(row), vals.append(total)
    matrix = coo_matrix((vals, (rows, cols)), shape=(unknown.size, unknown.size)).tocsc()
    solution = spsolve(matrix, rhs).reshape(unknown.size, -1)
    result = image.reshape(image.shape[0], -1).copy()
    result[:, unknown] = solution.T
    return result.reshape(image.shape)


def smooth_maps(batch, height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(batch, 1, 5, 4, generator=generator), size=(height, width), mode="bilinear")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_linear_imputation_equals_direct_sparse_solve(fraction):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 37, 30, generator=generator, dtype=torch.float64)
    maps = smooth_maps(3, 37, 30, seed=2)
    maps[2] = torch.rand(1, 37, 30, generator=generator)  # scattered pixels
    removed = pixel_ranks(maps) < round(fraction * 37 * 30)
    imputed, iterations = solve_linear_imputation(images, removed, tol=1e-10)
    for b in range(3):
        expected = direct_solve(images[b].numpy(), removed[b, 0].numpy())
        np.testing.assert_allclose(imputed[b].numpy(), expected, atol=1e-8)
    assert (iterations > 0).all()
    # float32 at the default tolerance meets the 1e-4 contract
    imputed32 = noisy_linear_impute(images.float(), removed, noise_std=0)
    for b in range(3):
        expected = direct_solve(images[b].numpy(), removed[b, 0].numpy())
        np.testing.assert_allclose(imputed32[b].numpy(), expected, atol=1e-4)


def test_noise_free_imputation_equals_grad_cam():
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 28, generator=generator)
    removed = pixel_ranks(smooth_maps(2, 32, 28, seed=4)) < 0.6 * 32 * 28
    ours = noisy_linear_impute(images, removed, noise_std=0)
    imputer = road.NoisyLinearImputer(noise=0)
    for b in range(2):
        # grad-cam's mask marks the pixels it keeps
        theirs = imputer(images[b], (~removed[b, 0]).float())
        torch.testing.assert_close(ours[b], theirs, atol=1e-4, rtol=0)


def test_imputation_edge_cases_and_noise():
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 12, 12, generator=generator)
    nothing = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
    assert noisy_linear_impute(images, nothing, generator=generator).equal(images)
    everything = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    assert (noisy_linear_impute(images, everything, noise_std=0) == 0).all()
    # a constant image is imputed by the same constant; the noise lands on removed pixels only
    constant = torch.full((2, 3, 12, 12), 0.25)
    removed = torch.rand(2, 1, 12, 12, generator=generator) > 0.5
    torch.testing.assert_close(noisy_linear_impute(constant, removed, noise_std=0), constant)
    noisy = noisy_linear_impute(constant, removed, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    again = noisy_linear_impute(constant, removed, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    assert noisy.equal(again)
    kept = ~removed.expand_as(constant)
    assert noisy[kept].eq(0.25).all()
    deviation = noisy[~kept] - 0.25
    assert 0.007 < deviation.std().item() < 0.013
    with pytest.raises(ValueError, match="removed must have shape"):
        noisy_linear_impute(images, torch.zeros(2, 1, 5, 5))


def test_road_curve_zero_imputation_on_region_sum_model():
    region, images = region_toy()
    model = RegionSum(region).eval()
    maps = torch.cat([region, 1 - region])
    curves = road_curve(model, images.repeat(2, 1, 1, 1), maps, torch.zeros(2, dtype=torch.long), imputation="zero")
    removed_region = torch.tensor(
        [[min(p, 25) for p in range(0, 101, 10)], [max(p - 75, 0) for p in range(0, 101, 10)]], dtype=torch.float
    )
    torch.testing.assert_close(curves.logit, 75 - 3 * removed_region)
    torch.testing.assert_close(curves.logit_drop, 3 * removed_region)
    torch.testing.assert_close(curves.probability, torch.sigmoid(75 - 3 * removed_region))
    assert curves.correct.tolist() == [[1.0] * 11] * 2  # logit 0 ties with class 1: the first maximum wins
    assert curves.percentages.tolist() == list(range(0, 101, 10))
    least = road_curve(
        model, images, region, torch.zeros(1, dtype=torch.long), most_relevant_first=False, imputation="zero"
    )
    torch.testing.assert_close(least.logit, curves.logit[1:])


def test_road_curve_linear_is_batch_size_invariant():
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(3, 3, 16, 16, generator=generator)
    maps = smooth_maps(3, 16, 16, seed=7)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
    targets = torch.tensor([0, 1, 3])
    percentages = [0, 25, 50, 100]
    whole = road_curve(model, images, maps, targets, percentages, generator=torch.Generator().manual_seed(0))
    single = road_curve(
        model, images, maps, targets, percentages, generator=torch.Generator().manual_seed(0), batch_size=1
    )
    torch.testing.assert_close(single.logit, whole.logit, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.logit[:, 0], model(images)[torch.arange(3), targets].detach())
    # a region-sum model on a constant image: the linear imputation restores the constant
    region, constant = region_toy()
    noise_free = road_curve(
        RegionSum(region),
        constant,
        torch.rand(1, 1, 10, 10, generator=generator),
        torch.zeros(1, dtype=torch.long),
        noise_std=0,
    )
    # (at 100 % nothing is known and the imputation is 0)
    torch.testing.assert_close(noise_free.logit, torch.tensor([[75.0] * 10 + [0.0]]), atol=1e-3, rtol=0)


def test_road_curve_noise_seeds_make_each_curve_independent_of_the_other_samples():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    maps = smooth_maps(3, 16, 16, seed=11)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
    targets = torch.tensor([2, 0, 1])
    seeds = torch.tensor([101, 202, 303])
    percentages = [0, 30, 60]
    whole = road_curve(model, images, maps, targets, percentages, noise_seeds=seeds)
    reordered = road_curve(model, images[[2, 0]], maps[[2, 0]], targets[[2, 0]], percentages, noise_seeds=seeds[[2, 0]])
    torch.testing.assert_close(reordered.logit, whole.logit[[2, 0]], atol=1e-5, rtol=0)
    other = road_curve(model, images, maps, targets, percentages, noise_seeds=seeds + 1)
    assert not torch.allclose(other.logit[:, 1:], whole.logit[:, 1:], atol=1e-6)  # the seed draws the noise
    with pytest.raises(ValueError, match="either a generator or noise_seeds"):
        road_curve(model, images, maps, targets, percentages, generator=torch.Generator(), noise_seeds=seeds)
    with pytest.raises(ValueError, match=r"noise_seeds must hold one integer per image, shape \(3,\)"):
        road_curve(model, images, maps, targets, percentages, noise_seeds=seeds[:2])


def test_road_curve_refuses_bad_targets_and_a_logit_drop_not_from_zero():
    region, images = region_toy()
    model = RegionSum(region).eval()
    with pytest.raises(ValueError, match=r"targets must hold one class index per image, shape \(2,\)"):
        road_curve(model, images.repeat(2, 1, 1, 1), region.repeat(2, 1, 1, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="percentages is empty"):
        road_curve(model, images, region, torch.zeros(1, dtype=torch.long), [])
    curves = road_curve(model, images, region, torch.zeros(1, dtype=torch.long), [10, 50], imputation="zero")
    with pytest.raises(ValueError, match="include 0 as the first percentage"):
        _ = curves.logit_drop  # the property raises


@pytest.mark.gpu
def test_road_curve_same_on_cpu_and_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    generator = torch.Generator().manual_seed(8)
    images = torch.rand(4, 3, 48, 48, generator=generator)
    maps = smooth_maps(4, 48, 48, seed=9)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 5)).eval()
    targets = torch.tensor([0, 1, 2, 3])
    cpu = road_curve(model, images, maps, targets, generator=torch.Generator().manual_seed(0))
    gpu = road_curve(
        model.cuda(), images.cuda(), maps.cuda(), targets.cuda(), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(gpu.logit.cpu(), cpu.logit, atol=1e-4, rtol=1e-4)
    seeds = torch.tensor([5, 6, 7, 8])
    keyed_cpu = road_curve(model.cpu(), images, maps, targets, noise_seeds=seeds)
    keyed_gpu = road_curve(model.cuda(), images.cuda(), maps.cuda(), targets.cuda(), noise_seeds=seeds)
    torch.testing.assert_close(keyed_gpu.logit.cpu(), keyed_cpu.logit, atol=1e-4, rtol=1e-4)
