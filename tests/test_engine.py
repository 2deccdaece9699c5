"""Behaviour of the FAME engine (the FAME paper) on tiny networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from naive_fame import naive_classification_loss, naive_fame
from nets import TinyBackbone, TinyClassifier, TinyEmbedder
from torch import nn

from fame import FameConfig, explain, explain_classification, explain_feature_map, explain_verification
from fame.explain import LayerNotReached, attribution_map, lots_perturbation, normalize_maps, to_gray

DOUBLE = torch.float64


def images(batch=3, channels=3, size=12, seed=0, dtype=DOUBLE):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator, dtype=dtype)


# ---------------------------------------------------------------- agreement with the naive version

SMALL = dict(step_size=0.02, iterations=6, blur_kernel=5, blur_sigma=1.3)


@pytest.mark.parametrize("loss", ["logit", "abs_logit", "log_softmax", "probability", "margin"])
def test_classification_matches_naive(loss):
    model = TinyClassifier().to(DOUBLE).eval()
    x = images()
    targets = torch.tensor([0, 3, 1])
    maps = explain_classification(model, x, targets, FameConfig(**SMALL), loss=loss)
    for i in range(x.shape[0]):

        def loss_of_one(one, target=int(targets[i])):
            return naive_classification_loss(model(one)[0], target, loss)

        expected = naive_fame(loss_of_one, x[i], **SMALL)
        np.testing.assert_allclose(maps[i, 0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["similar", "dissimilar"])
def test_verification_matches_naive(mode):
    model = TinyEmbedder().to(DOUBLE).eval()
    x, references = images(seed=1), images(seed=2)
    config = FameConfig(**SMALL, epsilon=0.5 if mode == "dissimilar" else None)
    maps = explain_verification(model, x, references, config, modes=(mode,))[mode]
    for i in range(x.shape[0]):
        reference = model(references[i : i + 1]).detach()

        def loss(one, reference=reference):
            s = F.cosine_similarity(model(one), reference, eps=0.0)[0]
            return s if mode == "similar" else 1 - s

        expected = naive_fame(loss, x[i], **SMALL, epsilon=config.epsilon)
        np.testing.assert_allclose(maps[i, 0].numpy(), expected, atol=1e-5)


def test_feature_map_matches_naive():
    model = TinyBackbone().to(DOUBLE).eval()
    x = images(batch=1, size=12)
    locations = [(0, 0), (2, 3), (5, 5)]
    maps = explain_feature_map(model, model.stage1, x, locations, FameConfig(**SMALL))
    assert maps.shape == (3, 1, 12, 12)
    for k, (row, col) in enumerate(locations):

        def loss(one, row=row, col=col):
            return model.stage1(one)[0, :, row, col].abs().sum()

        expected = naive_fame(loss, x[0], **SMALL)
        np.testing.assert_allclose(maps[k, 0].numpy(), expected, atol=1e-5)


def test_default_feature_map_locations_cover_the_grid_row_major():
    model = TinyBackbone().to(DOUBLE)
    x = images(batch=1, size=12)
    config = FameConfig(**SMALL)
    every = explain_feature_map(model, "stage2", x, config=config)
    assert every.shape == (9, 1, 12, 12)  # stage2 output is 3x3
    one = explain_feature_map(model, "stage2", x[0], [(1, 2)], config=config)
    torch.testing.assert_close(every[1 * 3 + 2], one[0], atol=1e-10, rtol=0)
    chunked = explain_feature_map(model, "stage2", x, config=config, batch_size=4)
    torch.testing.assert_close(chunked, every, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- per-sample semantics


def test_batch_equals_one_at_a_time_with_1000x_gradient_scale():
    model = TinyClassifier().to(DOUBLE)
    x = images(batch=4)
    scale = torch.tensor([1.0, 1000.0, 0.001, 1.0], dtype=DOUBLE)
    targets = torch.tensor([1, 2, 0, 4])

    def objective(batch, index):
        return model(batch).gather(1, targets[index].view(-1, 1)).squeeze(1) * scale[index]

    config = FameConfig(**SMALL)
    batched = explain(model, x, objective, config)
    for i in range(x.shape[0]):

        def one(batch, index, i=i):
            return model(batch)[:, targets[i]] * scale[i]

        single = explain(model, x[i : i + 1], one, config)
        torch.testing.assert_close(batched[i], single[0], atol=1e-10, rtol=0)


def test_plain_callable_objective_equals_subset_objective():
    model = TinyClassifier().to(DOUBLE)
    x = images(batch=3)
    targets = torch.tensor([0, 1, 2])
    config = FameConfig(**SMALL, epsilon=-0.05)
    plain = explain(model, x, lambda batch: model(batch).gather(1, targets.view(-1, 1)).squeeze(1), config)
    reference = explain_classification(model, x, targets, config)
    torch.testing.assert_close(plain, reference, atol=1e-10, rtol=0)


def test_early_stopping_per_sample_and_finished_samples_leave_the_batch():
    x = torch.zeros(3, 1, 8, 8, dtype=DOUBLE)
    start = torch.tensor([0.05, 1.0, 3.0], dtype=DOUBLE)  # sample 0 starts below epsilon
    seen = []

    def objective(batch, index):
        seen.append(index.tolist())
        return start[index] + batch.flatten(1).sum(dim=1)  # every pixel has gradient 1

    config = FameConfig(step_size=0.01, iterations=50, epsilon=0.1, blur_kernel=None)
    result = lots_perturbation(objective, x, config)
    stats = result.stats
    # each step lowers the loss by 64 * 0.01 = 0.64: sample 1 needs 2 steps, sample 2 needs 5
    assert stats.iterations.tolist() == [0, 2, 5]
    assert torch.all(result.perturbed[0] == 0)
    assert torch.allclose(result.perturbed[1], torch.full_like(x[1], -0.02))
    assert torch.allclose(result.perturbed[2], torch.full_like(x[2], -0.05))
    assert seen[0] == [0, 1, 2] and seen[1] == [1, 2] and seen[3] == [2] and seen[-1] == [2]
    assert len(seen) == 6  # 5 steps of sample 2, then the final check
    torch.testing.assert_close(stats.initial_loss, start)
    assert torch.all(stats.final_loss < 0.1)


def test_epsilon_above_every_loss_gives_zero_maps_without_nan():
    model = TinyClassifier().to(DOUBLE)
    x = images()
    maps, stats = explain_classification(model, x, [0, 1, 2], FameConfig(**SMALL, epsilon=1e6), return_stats=True)
    assert torch.equal(maps, torch.zeros_like(maps))
    assert stats.iterations.tolist() == [0, 0, 0]
    for normalization in ("max", "none"):
        maps = explain_classification(
            model, x, [0, 1, 2], FameConfig(**SMALL, epsilon=1e6, normalization=normalization)
        )
        assert not torch.isnan(maps).any() and torch.all(maps == 0)


def test_stats_report_iterations_and_losses():
    model = TinyClassifier().to(DOUBLE)
    x = images()
    maps, stats = explain_classification(model, x, [0, 1, 2], FameConfig(**SMALL), return_stats=True)
    assert stats.iterations.tolist() == [6, 6, 6]
    with torch.no_grad():
        logits = model.eval()(x)
    torch.testing.assert_close(stats.initial_loss, logits[[0, 1, 2], [0, 1, 2]])
    assert torch.all(stats.final_loss < stats.initial_loss)


# ---------------------------------------------------------------- the step itself


def test_loss_goes_down_and_no_pixel_moves_further_than_budget():
    model = TinyClassifier().to(DOUBLE)
    x = images()
    config = FameConfig(step_size=0.01, iterations=25, blur_kernel=None)
    targets = torch.tensor([0, 1, 2])
    result = lots_perturbation(lambda batch: model.eval()(batch)[torch.arange(3), targets], x, config)
    assert torch.all(result.stats.final_loss < result.stats.initial_loss)
    assert (result.perturbed - x).abs().max() <= 25 * 0.01 + 1e-12


def test_one_step_moves_the_largest_gradient_pixel_by_exactly_the_step():
    weights = torch.randn(2, 3, 5, 5, dtype=DOUBLE, generator=torch.Generator().manual_seed(3))
    x = images(batch=2, size=5)

    def objective(batch):
        return (batch * weights).flatten(1).sum(dim=1)  # gradient = weights

    result = lots_perturbation(objective, x, FameConfig(step_size=0.1, iterations=1))
    moved = (result.perturbed - x).abs()
    for i in range(2):
        peak = weights[i].abs().argmax()
        assert moved[i].flatten()[peak].item() == pytest.approx(0.1, abs=1e-15)
        assert moved[i].max().item() == pytest.approx(0.1, abs=1e-15)
        torch.testing.assert_close(result.perturbed[i] - x[i], -0.1 * weights[i] / weights[i].abs().max())


def test_clamp_keeps_pixels_in_range():
    x = images()
    config = FameConfig(step_size=0.2, iterations=10, clamp=(0.0, 1.0))
    result = lots_perturbation(lambda batch: batch.flatten(1).sum(dim=1), x, config)
    assert result.perturbed.min() >= 0.0
    unclamped = lots_perturbation(lambda batch: batch.flatten(1).sum(dim=1), x, config.replace(clamp=None))
    assert unclamped.perturbed.min() < -1.0


# ---------------------------------------------------------------- the map


def test_gray_is_taken_before_subtracting():
    x = torch.zeros(1, 3, 6, 6, dtype=DOUBLE)
    perturbed = x.clone()
    perturbed[0, 0, 1, 1] = 0.5  # red up
    perturbed[0, 1, 1, 1] = -0.25  # green down: luma change 0.2989*0.5 - 0.587*0.25 = 0.00270
    perturbed[0, 2, 4, 4] = 0.5  # blue only: luma change 0.057
    maps = attribution_map(x, perturbed, FameConfig(blur_kernel=None, normalization="none"))
    luma = torch.tensor([0.2989 * 0.5 - 0.587 * 0.25, 0.114 * 0.5], dtype=DOUBLE).abs()
    assert maps[0, 0, 1, 1].item() == pytest.approx((luma[0] / luma.max()).item())
    assert maps[0, 0, 4, 4].item() == pytest.approx(1.0)
    torch.testing.assert_close(
        to_gray(x[:, :, :1, :1] + torch.tensor([1.0, 0, 0], dtype=DOUBLE).view(1, 3, 1, 1)),
        torch.full((1, 1, 1, 1), 0.2989, dtype=DOUBLE),
    )


def test_normalizations_and_even_kernel():
    x = images(batch=2, size=10)
    perturbed = x + 0.1 * images(batch=2, size=10, seed=9)
    minmax = attribution_map(x, perturbed, FameConfig(blur_kernel=4, blur_sigma=1.0))
    odd = attribution_map(x, perturbed, FameConfig(blur_kernel=5, blur_sigma=1.0))
    torch.testing.assert_close(minmax, odd)  # 4 is bumped to 5
    assert minmax.amin(dim=(1, 2, 3)).abs().max() < 1e-12
    assert torch.all((minmax.amax(dim=(1, 2, 3)) - 1).abs() < 1e-6)
    maxed = attribution_map(x, perturbed, FameConfig(blur_kernel=5, blur_sigma=1.0, normalization="max"))
    assert torch.all((maxed.amax(dim=(1, 2, 3)) - 1).abs() < 1e-6) and maxed.min() > 0
    raw = torch.tensor([[[[0.0, 2.0], [1.0, 3.0]]]], dtype=DOUBLE)
    torch.testing.assert_close(normalize_maps(raw, "minmax"), raw / (3 + 1e-8))
    torch.testing.assert_close(normalize_maps(raw + 1, "max"), (raw + 1) / (4 + 1e-8))


def test_paper_defaults():
    config = FameConfig()
    assert config.step_size == 1 / 255 and config.iterations == 500 and config.epsilon == "task"
    assert config.for_task("classification").epsilon is None and config.for_task("feature_map").epsilon is None
    assert config.for_task("verification").epsilon == 0.01 and config.stop_below is None
    assert config.blur_kernel == 49 and config.blur_sigma == 7.7 and config.normalization == "minmax"
    assert config.clamp is None and config.precision == "32" and not config.channels_last and not config.compile


# ---------------------------------------------------------------- the model is left as found


def _snapshot(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_left_exactly_as_found():
    model = TinyBackbone().to(DOUBLE)
    model.train()
    model.stage2.eval()
    model.head.weight.requires_grad_(False)
    model.stage1[0].weight.grad = torch.ones_like(model.stage1[0].weight)
    before = _snapshot(model)
    config = FameConfig(**SMALL)
    explain_classification(model, images(), [0, 1, 2], config)
    explain_feature_map(model, model.stage1, images(batch=1), [(1, 1)], config)
    explain_verification(model, images(), images(seed=4), config)
    after = _snapshot(model)
    assert before[0] == after[0] and before[1] == after[1]
    for old, new in zip(before[2], after[2]):
        assert (old is None and new is None) or torch.equal(old, new)
    for key in before[3]:
        assert torch.equal(before[3][key], after[3][key])
    assert _hooks(model) == 0
    assert sum(p.grad is not None for p in model.parameters()) == 1


def test_model_restored_when_the_objective_raises():
    model = TinyClassifier().to(DOUBLE).train()

    def broken(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        explain(model, images(), broken, FameConfig(**SMALL))
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_eval_mode_is_used_so_batchnorm_and_dropout_are_deterministic():
    model = TinyClassifier().to(DOUBLE).train()
    x = images()
    first = explain_classification(model, x, [0, 1, 2], FameConfig(**SMALL))
    second = explain_classification(model, x, [0, 1, 2], FameConfig(**SMALL))
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_works_under_inference_mode_and_no_grad(context):
    model = TinyClassifier().to(DOUBLE)
    embedder = TinyEmbedder().to(DOUBLE)
    backbone = TinyBackbone().to(DOUBLE)
    config = FameConfig(**SMALL)
    expected = explain_classification(model, images(), [0, 1, 2], config)
    with context():
        x = images()  # an inference tensor under inference_mode
        maps = explain_classification(model, x, torch.tensor([0, 1, 2]), config)
        pair = explain_verification(embedder, x, images(seed=3), config)
        cells = explain_feature_map(backbone, "stage1", x[:1], [(0, 0)], config)
    torch.testing.assert_close(maps, expected)
    assert pair["similar"].shape == (3, 1, 12, 12) and cells.shape == (1, 1, 12, 12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_follows_input_dtype_and_range(dtype):
    model = TinyClassifier().to(dtype)
    maps = explain_classification(model, images(dtype=dtype), [0, 1, 2], FameConfig(**SMALL))
    assert maps.dtype == dtype and maps.shape == (3, 1, 12, 12)
    assert maps.min() >= 0 and maps.max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = TinyClassifier().to(DOUBLE)
    config = FameConfig(**SMALL)
    cpu = explain_classification(model, images(), [0, 1, 2], config)
    gpu = explain_classification(model.cuda(), images().cuda(), torch.tensor([0, 1, 2]).cuda(), config)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-8, rtol=0)


# ---------------------------------------------------------------- verification specifics


def test_verification_reference_broadcast_and_modes_batched():
    model = TinyEmbedder().to(DOUBLE)
    x, reference = images(), images(batch=1, seed=5)
    config = FameConfig(**SMALL)
    broadcast = explain_verification(model, x, reference[0], config)
    repeated = explain_verification(model, x, reference.expand(3, -1, -1, -1), config)
    assert set(broadcast) == {"similar", "dissimilar"}
    for mode in broadcast:
        torch.testing.assert_close(broadcast[mode], repeated[mode])
        alone = explain_verification(model, x, reference, config, modes=(mode,))[mode]
        torch.testing.assert_close(broadcast[mode], alone, atol=1e-10, rtol=0)


def test_verification_default_uses_paper_epsilon():
    model = TinyEmbedder().to(DOUBLE)
    x = images(batch=2)
    _, stats = explain_verification(
        model, x, x, FameConfig(**SMALL, epsilon=0.01), modes=("dissimilar",), return_stats=True
    )
    # an image against itself: 1 - s = 0 < 0.01, nothing to do
    assert stats["dissimilar"].iterations.tolist() == [0, 0]
    assert torch.all(stats["dissimilar"].initial_loss.abs() < 1e-6)


# ---------------------------------------------------------------- errors


def test_clear_errors():
    model = TinyClassifier().to(DOUBLE)
    x = images()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explain_classification(model, x[0], [0], FameConfig(**SMALL))
    with pytest.raises(ValueError, match="1 \\(gray\\) or 3 \\(RGB\\) channels"):
        explain_classification(model, torch.rand(2, 4, 8, 8), [0, 1])
    with pytest.raises(ValueError, match=r"one class index per image, shape \(3,\)"):
        explain_classification(model, x, [0, 1], FameConfig(**SMALL))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        explain_classification(model, x, [0, 1, 7], FameConfig(**SMALL))
    with pytest.raises(TypeError, match="integer class indices"):
        explain_classification(model, x, torch.tensor([0.0, 1.0, 2.0]), FameConfig(**SMALL))
    with pytest.raises(ValueError, match="unknown FameConfig.normalization 'softmax'"):
        FameConfig(normalization="softmax")
    with pytest.raises(ValueError, match="blur kernel 49 is too large for 12x12"):
        explain_classification(model, x, [0, 1, 2], FameConfig(iterations=1))
    backbone = TinyBackbone().to(DOUBLE)
    with pytest.raises(LayerNotReached, match="never reached"):
        explain_feature_map(backbone, backbone.unused, x[:1], config=FameConfig(**SMALL))
    with pytest.raises(ValueError, match="no submodule named 'layer4'"):
        explain_feature_map(backbone, "layer4", x[:1], config=FameConfig(**SMALL))
    with pytest.raises(ValueError, match="inside the layer's 6x6 feature map"):
        explain_feature_map(backbone, "stage1", x[:1], [(6, 0)], FameConfig(**SMALL))
    with pytest.raises(ValueError, match="not a submodule"):
        explain_feature_map(backbone, nn.Conv2d(3, 3, 1), x[:1], config=FameConfig(**SMALL))
    with pytest.raises(ValueError, match="one image or one per sample"):
        explain_verification(TinyEmbedder().to(DOUBLE), x, images(batch=2), FameConfig(**SMALL))
    with pytest.raises(ValueError, match="modes must be"):
        explain_verification(TinyEmbedder().to(DOUBLE), x, x, FameConfig(**SMALL), modes=("positive",))
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(3,\)"):
        explain(model, x, lambda batch: batch.sum(), FameConfig(**SMALL))
    assert _hooks(backbone) == 0


# ---------------------------------------------------------------- defects of issue 7


def test_verification_keeps_the_paper_epsilon_with_a_custom_config():
    model = TinyEmbedder().to(DOUBLE)
    x = images(batch=2)
    custom = FameConfig(**SMALL)  # other blur and steps, epsilon left to the task
    _, stats = explain_verification(model, x, x, custom, modes=("dissimilar",), return_stats=True)
    assert stats["dissimilar"].iterations.tolist() == [0, 0]  # 1 - s = 0 < 0.01 at x_0
    _, stats = explain_verification(model, x, x, custom.replace(epsilon=None), modes=("dissimilar",), return_stats=True)
    assert stats["dissimilar"].iterations.tolist() == [6, 6]  # explicit None: all T steps
    classification = explain_classification(
        TinyClassifier().to(DOUBLE), x, [0, 1], custom.replace(epsilon="task"), return_stats=True
    )[1]
    assert classification.iterations.tolist() == [6, 6]  # the task default of classification is None


def test_margin_with_epsilon_zero_stops_when_the_class_is_no_longer_on_top():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 5)).to(DOUBLE)
    x = images(batch=6, seed=11)
    with torch.no_grad():
        predicted = model.eval()(x).argmax(dim=1)
    config = FameConfig(step_size=0.005, iterations=40, blur_kernel=5, blur_sigma=1.3, epsilon=0.0)
    maps, stats = explain_classification(model, x, predicted, config, loss="margin", return_stats=True)
    assert torch.all(stats.initial_loss > 0) and torch.all(stats.iterations >= 1)
    assert torch.all(maps.flatten(1).amax(dim=1) > 0)  # no correctly classified image gets an empty map
    stopped = stats.iterations < 40
    assert stopped.any() and torch.all(stats.final_loss[stopped] < 0)
    with pytest.raises(ValueError, match="unknown classification loss 'hinge'"):
        explain_classification(model, x, predicted, config, loss="hinge")


def test_non_finite_pixels_and_step_sizes_are_refused():
    model = TinyClassifier().to(DOUBLE)
    x = images()
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    with pytest.raises(
        ValueError, match=r"images contain 2 non-finite pixel values \(NaN or Inf\) in samples \[1, 2\]"
    ):
        explain_classification(model, x, [0, 1, 2], FameConfig(**SMALL))
    with pytest.raises(ValueError, match=r"reference_images contain 1 non-finite"):
        explain_verification(TinyEmbedder().to(DOUBLE), images(), x[1:2], FameConfig(**SMALL))
    for bad in (float("inf"), float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match="FameConfig.step_size must be a finite number > 0"):
            FameConfig(step_size=bad)
    with pytest.raises(ValueError, match="FameConfig.epsilon must be"):
        FameConfig(epsilon="paper")
    with pytest.raises(ValueError, match="FameConfig.epsilon must be"):
        FameConfig(epsilon=float("nan"))


def test_a_loss_that_becomes_non_finite_names_the_samples():
    x = torch.zeros(3, 1, 4, 4, dtype=DOUBLE)
    start = torch.tensor([5.0, 0.5, 5.0], dtype=DOUBLE)

    def objective(batch, index):  # the log's argument drops by 16 * 0.1 per step: sample 1 goes below 0
        return torch.log(start[index] + batch.flatten(1).sum(dim=1))

    for epsilon in (None, -100.0):
        with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or Inf\) for samples \[1\]"):
            lots_perturbation(objective, x, FameConfig(step_size=0.1, iterations=3, blur_kernel=None, epsilon=epsilon))
    with pytest.raises(FloatingPointError, match=r"for samples \[0, 2\]"):
        lots_perturbation(lambda batch: torch.log(batch.flatten(1).sum(dim=1) - start + 1), x, FameConfig(iterations=1))
