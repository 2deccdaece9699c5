"""FameConfig's stopping rules (docs/method.md#stopping) against literal per-sample loops.

Each rule is written out again below from its definition, one image at a time, in float64, where
the engine's maps are bit-identical to a per-image run; maps and iteration counts must agree.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from naive_fame import naive_gaussian_blur, naive_gray
from nets import TinyClassifier, TinyEmbedder
from scipy import stats
from torch import nn

from fame import FameConfig, explain_classification, explain_verification
from fame.explain import explain
from fame.explain.engine import rank_correlation

ROOT = Path(__file__).resolve().parents[1]
BLUR = {"blur_kernel": 5, "blur_sigma": 1.1}


def naive_low_resolution(x, image, size):
    """|gray(x) - gray(image)| as the mean of each size x size cell (the whole map when it is smaller)."""
    difference = np.abs(naive_gray(x).numpy() - naive_gray(image).numpy())
    height, width = difference.shape
    if min(height, width) > size:
        difference = difference.reshape(size, height // size, size, width // size).mean(axis=(1, 3))
    return difference.ravel()


def naive_spearman(first, second):
    """scipy's Spearman correlation (average ranks of ties; NaN for a map without variation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stats.spearmanr(first, second).statistic


def naive_stopping_run(loss_and_margin_of_one, image, config):
    """(x at the stop, steps taken) for one image (C, H, W), each rule applied as its definition reads.

    flip: f is the first t with margin(x_t) < 0; the sample stops at x_{f + stop_after}.
    settled: at every t = k, 2k, ... the low-resolution map of x_t is compared with the one of
    x_{t-k} (x_0's is zero); a Spearman correlation above the tolerance stops it at x_t.
    """
    x = image.clone()
    flipped_at = None
    previous = naive_low_resolution(image, image, config.settle_size)
    steps = 0
    for t in range(config.iterations):
        x = x.detach().requires_grad_(True)
        loss, margin = loss_and_margin_of_one(x.unsqueeze(0))
        if config.stop == "flip":
            if flipped_at is None and margin.item() < 0:
                flipped_at = t
            if flipped_at is not None and t >= flipped_at + config.stop_after:
                break
        if config.stop == "settled" and t > 0 and t % config.settle_every == 0:
            current = naive_low_resolution(x.detach(), image, config.settle_size)
            correlation = naive_spearman(current, previous)
            previous = current
            if correlation > config.settle_tolerance:
                break
        (gradient,) = torch.autograd.grad(loss, x)
        biggest = gradient.abs().max()
        x = x - config.step_size * gradient / (biggest if biggest > 0 else 1.0)
        steps += 1
    return x.detach(), steps


def naive_map(x, image, config):
    """The FAME map of x_T (minmax normalization), as tests/naive_fame.py computes it."""
    difference = np.abs(naive_gray(x).numpy() - naive_gray(image).numpy())
    if difference.max() > 0:
        difference = difference / difference.max()
    difference = naive_gaussian_blur(difference, config.blur_kernel, config.blur_sigma)
    return (difference - difference.min()) / (difference.max() - difference.min() + 1e-8)


def logit_and_margin(model, target):
    def of_one(x):
        logits = model(x)[0]
        others = torch.cat([logits[:target], logits[target + 1 :]])
        return logits[target], logits[target] - others.max()

    return of_one


def similarity_and_margin(model, reference, dissimilar, threshold):
    reference = F.normalize(model(reference.unsqueeze(0)).detach(), dim=1)[0]

    def of_one(x):
        similarity = (F.normalize(model(x), dim=1)[0] * reference).sum()
        if dissimilar:
            return 1.0 - similarity, threshold - similarity
        return similarity, similarity - threshold

    return of_one


def classifier_and_images(count=6, seed=3):
    model = TinyClassifier().double().eval()
    images = torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, images, model(images).argmax(1)


def assert_matches_naive(maps, iterations, expected):
    for k, (x_naive, steps) in enumerate(expected):
        assert int(iterations[k]) == steps, f"sample {k}: {int(iterations[k])} steps, the literal loop {steps}"
        np.testing.assert_allclose(maps[k, 0].numpy(), x_naive, atol=1e-10)


@pytest.mark.parametrize("stop_after", [0, 4])
def test_flip_rule_equals_the_literal_loop(stop_after):
    model, images, targets = classifier_and_images()
    config = FameConfig(step_size=0.2, iterations=40, stop="flip", stop_after=stop_after, **BLUR)
    maps, stats_ = explain_classification(model, images, targets, config, return_stats=True)
    expected = []
    for image, target in zip(images, targets.tolist()):
        x, steps = naive_stopping_run(logit_and_margin(model, target), image, config)
        expected.append((naive_map(x, image, config), steps))
    assert_matches_naive(maps, stats_.iterations, expected)
    steps = stats_.iterations.tolist()
    assert min(steps) < config.iterations and len(set(steps)) > 1  # the rule fired, at different steps


@pytest.mark.parametrize("mode", ["similar", "dissimilar"])
def test_flip_rule_for_verification_watches_the_pair_threshold(mode):
    model = TinyEmbedder(size=16).double().eval()
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(4, 3, 16, 16, generator=generator, dtype=torch.float64)
    references = torch.rand(4, 3, 16, 16, generator=generator, dtype=torch.float64)  # s = 0.83, 0.77, 0.96, 0.90
    below, above = [0.5, 0.6, 0.7, 0.8], [0.9, 0.95, 0.97, 0.99]
    thresholds = torch.tensor(below if mode == "similar" else above, dtype=torch.float64)
    config = FameConfig(step_size=0.03, iterations=30, epsilon=None, stop="flip", stop_after=2, **BLUR)
    maps, stats_ = explain_verification(
        model, images, references, config, modes=(mode,), return_stats=True, threshold=thresholds
    )
    expected = []
    for image, reference, threshold in zip(images, references, thresholds.tolist()):
        of_one = similarity_and_margin(model, reference, mode == "dissimilar", threshold)
        x, steps = naive_stopping_run(of_one, image, config)
        expected.append((naive_map(x, image, config), steps))
    assert_matches_naive(maps[mode], stats_[mode].iterations, expected)
    assert len(set(stats_[mode].iterations.tolist())) > 1


@pytest.mark.parametrize("size,tolerance", [(4, 0.9), (16, 0.99)])
def test_settled_rule_equals_the_literal_loop(size, tolerance):
    model, images, targets = classifier_and_images()
    config = FameConfig(
        step_size=0.02, iterations=60, stop="settled", settle_every=5, settle_tolerance=tolerance, settle_size=size
    )
    config = config.replace(**BLUR)
    maps, stats_ = explain_classification(model, images, targets, config, return_stats=True)
    expected = []
    for image, target in zip(images, targets.tolist()):
        x, steps = naive_stopping_run(logit_and_margin(model, target), image, config)
        expected.append((naive_map(x, image, config), steps))
    assert_matches_naive(maps, stats_.iterations, expected)
    assert min(stats_.iterations.tolist()) < config.iterations


@pytest.mark.parametrize(
    "changes",
    [
        {"stop": "flip", "stop_after": 3},
        {"stop": "settled", "settle_every": 4, "settle_tolerance": 0.8, "settle_size": 8},
        {"stop": "flip", "stop_after": 2, "loss": "margin", "epsilon": -0.5},
    ],
)
def test_batched_equals_one_at_a_time(changes):
    model, images, targets = classifier_and_images(count=5, seed=11)
    loss = changes.pop("loss", "logit")
    config = FameConfig(step_size=0.03, iterations=30, **BLUR, **changes)
    maps, stats_ = explain_classification(model, images, targets, config, loss=loss, return_stats=True)
    for k in range(images.shape[0]):
        one, one_stats = explain_classification(
            model, images[k : k + 1], targets[k : k + 1], config, loss=loss, return_stats=True
        )
        assert torch.equal(maps[k : k + 1], one)
        assert torch.equal(stats_.iterations[k : k + 1], one_stats.iterations)
        torch.testing.assert_close(stats_.final_loss[k : k + 1], one_stats.final_loss, rtol=1e-12, atol=1e-12)


class SumAgainstConstant(nn.Module):
    """z_0 = sum of the pixels, z_1 = 7: the gradient of z_0 is 1 everywhere, so every step lowers
    each pixel by eta and z_0(x_t) = z_0(x_0) - t * eta * pixels."""

    def forward(self, x):
        total = x.sum(dim=(1, 2, 3))
        return torch.stack([total, torch.full_like(total, 7.0)], dim=1)


@pytest.mark.parametrize("stop_after,expected", [(0, 7), (3, 10), (50, 20)])
def test_flip_step_of_an_analytic_model(stop_after, expected):
    # 16 pixels at 0.5, eta 0.01: z_0(x_t) = 8 - 0.16 t falls below z_1 = 7 first at t = 7
    images = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    config = FameConfig(step_size=0.01, iterations=20, blur_kernel=None, stop="flip", stop_after=stop_after)
    result = explain_classification(SumAgainstConstant(), images, torch.tensor([0]), config, return_stats=True)
    assert int(result[1].iterations[0]) == expected
    assert float(result[1].final_loss[0]) == pytest.approx(8.0 - 0.16 * expected)


def test_a_map_without_variation_never_counts_as_settled():
    # the analytic model moves every pixel alike: the map is flat, its rank correlation undefined
    images = torch.full((2, 1, 8, 8), 0.5, dtype=torch.float64)
    config = FameConfig(step_size=0.01, iterations=12, blur_kernel=None, stop="settled", settle_every=2)
    _, stats_ = explain_classification(SumAgainstConstant(), images, torch.tensor([0, 0]), config, return_stats=True)
    assert stats_.iterations.tolist() == [12, 12]


def test_rank_correlation_is_spearmans():
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 5, (4, 30), generator=generator).double()  # many ties
    second = first + torch.rand(4, 30, generator=generator, dtype=torch.float64) * 3
    expected = [naive_spearman(a.numpy(), b.numpy()) for a, b in zip(first, second)]
    np.testing.assert_allclose(rank_correlation(first, second).numpy(), expected, rtol=1e-12)
    flat = rank_correlation(torch.zeros(1, 30), second[:1])
    assert torch.isnan(flat).all()


def test_the_fixed_rule_is_the_default_and_runs_every_step():
    model, images, targets = classifier_and_images(count=3)
    config = FameConfig(step_size=0.04, iterations=15, **BLUR)
    assert config.stop == "fixed"
    maps, stats_ = explain_classification(model, images, targets, config, return_stats=True)
    assert stats_.iterations.tolist() == [15, 15, 15]
    assert torch.equal(maps, explain_classification(model, images, targets, config.replace(stop="fixed")))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"stop": "soon"}, "unknown FameConfig.stop 'soon'"),
        ({"stop_after": -1}, "stop_after must be an integer >= 0"),
        ({"settle_every": 0}, "settle_every must be an integer >= 1"),
        ({"settle_size": 2.5}, "settle_size must be an integer >= 1"),
        ({"settle_tolerance": 1.0}, r"settle_tolerance must be a number in \[-1, 1\)"),
    ],
)
def test_stopping_options_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        FameConfig(**changes)


def test_flip_needs_a_decision_margin():
    model, images, targets = classifier_and_images(count=2)
    with pytest.raises(ValueError, match="needs the explained decision's margin"):
        explain(model, images, lambda x: model(x)[:, 0], FameConfig(iterations=2, stop="flip", **BLUR))
    embedder = TinyEmbedder(size=16).double()
    with pytest.raises(ValueError, match="needs the pair's threshold"):
        explain_verification(embedder, images, images, FameConfig(iterations=2, stop="flip", **BLUR))


def test_explain_py_refuses_a_bad_stopping_rule_in_one_line():
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(
        [sys.executable, str(ROOT / "explain.py"), "+explainer.fame.stop=soon"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2
    assert lines == [
        "explain.py: explainer.fame: unknown FameConfig.stop 'soon'; choose one of 'fixed', 'flip', 'settled'"
    ]
