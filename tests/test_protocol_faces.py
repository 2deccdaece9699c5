"""Face-recognition protocols against literal transcriptions of their reference definitions:
insightface's k-fold accuracy and interpolated VAL@FAR, the official AdaFace head's formulas,
ArcFace's straight-through margin and its fallback past pi - m, the recipe's config values and
the citations of CorrRISE / FGGB."""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy.interpolate import BSpline
from sklearn.model_selection import KFold

from fame.config import ConfigError
from fame.data import SyntheticFacePairs, SyntheticFaces, VerificationDataModule
from fame.lightning.face import FaceRecognizer, build_margin_head
from fame.lightning.schedules import polynomial_decay
from fame.metrics.verification import kfold_val_at_far, ten_fold_accuracy
from fame.models import AdaFaceHead, ArcFaceHead, CombinedMarginHead
from fame.stages.train import check_train_config

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ insightface's verification protocol
def insightface_accuracy(threshold, dist, actual_issame):
    """Accuracy of ``dist < threshold`` decisions (insightface's calculate_accuracy)."""
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    return float(tp + tn) / dist.size


def insightface_calculate_roc(thresholds, dist, actual_issame, nrof_folds=10):
    """Per fold: train-fold accuracy at every candidate, the first maximum, its test-fold accuracy."""
    accuracy = np.zeros(nrof_folds)
    best_thresholds = np.zeros(nrof_folds)
    indices = np.arange(len(dist))
    for fold_idx, (train_set, test_set) in enumerate(KFold(n_splits=nrof_folds, shuffle=False).split(indices)):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            acc_train[threshold_idx] = insightface_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        best_thresholds[fold_idx] = thresholds[best_threshold_index]
        accuracy[fold_idx] = insightface_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set]
        )
    return accuracy, best_thresholds


def insightface_val_far(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict_issame, actual_issame))
    false_accept = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    return float(true_accept) / float(n_same), float(false_accept) / float(n_diff)


def linear_spline(x_points, y_points, x):
    """scipy's ``interp1d(x_points, y_points, kind="slinear")(x)``: the degree-1 B-spline with
    knots (x0, x0, x1, ..., x_last, x_last) and coefficients y through the points sorted by x.
    Built directly because current scipy's interp1d refuses the repeated x that FAR(threshold)
    always has."""
    order = np.argsort(x_points, kind="mergesort")
    xs, ys = x_points[order], y_points[order]
    return float(BSpline(np.r_[xs[0], xs, xs[-1]], ys, 1)(x))


def insightface_calculate_val(thresholds, dist, actual_issame, far_target, nrof_folds=10):
    """Per fold: FAR(threshold) on the train folds, linearly interpolated at far_target (0 if never
    reached), then VAL and FAR on the test fold."""
    val, far, chosen = np.zeros(nrof_folds), np.zeros(nrof_folds), np.zeros(nrof_folds)
    indices = np.arange(len(dist))
    for fold_idx, (train_set, test_set) in enumerate(KFold(n_splits=nrof_folds, shuffle=False).split(indices)):
        far_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = insightface_val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= far_target:
            threshold = linear_spline(far_train, thresholds, far_target)
        else:
            threshold = 0.0
        chosen[fold_idx] = threshold
        val[fold_idx], far[fold_idx] = insightface_val_far(threshold, dist[test_set], actual_issame[test_set])
    return val, far, chosen


def pairs_with_ties_on_the_grid(num_pairs: int, seed: int, step: float):
    """Cosine scores whose squared distances 2 - 2 * score include exact grid points (``k * step``
    as numpy.arange makes them), repeated values and genuine / impostor pairs at the same distance."""
    rng = np.random.default_rng(seed)
    grid = np.arange(0, 4, step)
    on_grid = [t for t in grid if 2 - 2 * ((2 - t) / 2) == t]  # scores whose distance lands back on t exactly
    labels = rng.random(num_pairs) < 0.5
    distances = np.where(labels, rng.normal(0.9, 0.35, num_pairs), rng.normal(1.6, 0.35, num_pairs)).clip(0.0, 3.99)
    exact = rng.random(num_pairs) < 0.4
    distances[exact] = rng.choice(on_grid, int(exact.sum()))
    distances[5:12] = distances[4]  # ties across labels
    scores = (2 - distances) / 2
    return torch.from_numpy(scores), torch.from_numpy(labels), 2 - 2 * scores, labels


@pytest.mark.parametrize("num_pairs, folds, seed", [(203, 10, 0), (60, 10, 1), (57, 5, 2)])
def test_insightface_ten_fold_accuracy_equals_calculate_roc(num_pairs, folds, seed):
    scores, labels, dist, issame = pairs_with_ties_on_the_grid(num_pairs, seed, 0.01)
    assert (np.isin(dist, np.arange(0, 4, 0.01))).sum() > num_pairs // 4  # many pairs exactly on a threshold
    expected_accuracy, expected_thresholds = insightface_calculate_roc(np.arange(0, 4, 0.01), dist, issame, folds)
    result = ten_fold_accuracy(scores, labels, folds=folds)
    assert result["accuracies"].tolist() == expected_accuracy.tolist()  # every fold, to the last pair
    assert result["thresholds"].tolist() == expected_thresholds.tolist()
    assert result["accuracy_mean"] == pytest.approx(np.mean(expected_accuracy), abs=1e-15)
    assert result["accuracy_std"] == pytest.approx(np.std(expected_accuracy), abs=1e-15)
    exact = ten_fold_accuracy(scores, labels, folds=folds, thresholds="exact")
    assert exact["thresholds"].tolist() != result["thresholds"].tolist()  # the other protocol, one value away
    with pytest.raises(ValueError, match="thresholds must be one of"):
        ten_fold_accuracy(scores, labels, thresholds="midpoints")


@pytest.mark.parametrize("num_pairs, seed, far", [(120, 3, 0.0), (120, 3, 1e-3), (120, 3, 0.25), (41, 4, 0.1)])
def test_kfold_val_at_far_equals_calculate_val(num_pairs, seed, far):
    scores, labels, dist, issame = pairs_with_ties_on_the_grid(num_pairs, seed, 0.001)
    expected_val, expected_far, expected_thresholds = insightface_calculate_val(
        np.arange(0, 4, 0.001), dist, issame, far
    )
    result = kfold_val_at_far(scores, labels, far=far)
    assert result["thresholds"].numpy() == pytest.approx(expected_thresholds, abs=1e-12)
    assert result["vals"].tolist() == expected_val.tolist()
    assert result["fars"].tolist() == expected_far.tolist()
    assert result["val_mean"] == pytest.approx(np.mean(expected_val), abs=1e-15)
    assert result["val_std"] == pytest.approx(np.std(expected_val), abs=1e-15)
    assert result["far_mean"] == pytest.approx(np.mean(expected_far), abs=1e-15)


def test_kfold_val_at_far_at_the_highest_far_and_beyond_it():
    genuine = torch.full((10,), 0.5, dtype=torch.float64)
    labels = torch.tensor([1, 0] * 10)
    # impostors at distance 3.5: FAR 1 is the highest the training folds reach, and far=1 takes
    # the first grid point reaching it
    distances = torch.stack([genuine, torch.full((10,), 3.5, dtype=torch.float64)], dim=1).flatten()
    result = kfold_val_at_far((2 - distances) / 2, labels, far=1.0)
    grid = np.arange(0, 4, 0.001)
    assert result["thresholds"].tolist() == [grid[grid > 3.5][0]] * 10
    assert result["val_mean"] == 1.0 and result["far_mean"] == 1.0
    # impostors beyond the grid's last point 3.999: FAR 0.5 is never reached, the threshold is 0
    distances = torch.stack([genuine, torch.full((10,), 3.9995, dtype=torch.float64)], dim=1).flatten()
    result = kfold_val_at_far((2 - distances) / 2, labels, far=0.5)
    assert result["thresholds"].tolist() == [0.0] * 10 and result["val_mean"] == 0.0 and result["far_mean"] == 0.0


@pytest.mark.parametrize("thresholds", ["insightface", "exact"])
def test_face_recognizer_validates_with_the_chosen_threshold_protocol(thresholds):
    faces = SyntheticFaces(num_identities=6, images_per_identity=3, size=32, seed=0, first_identity=100)
    pairs = SyntheticFacePairs(faces, num_pairs=30)
    torch.manual_seed(0)
    model = FaceRecognizer(
        {"arch": "small", "input_size": 32, "widths": [8, 8, 8, 8]},
        None,
        3,
        8,
        val_sets=["synth"],
        thresholds=thresholds,
    )
    loader = VerificationDataModule(pairs, batch_size=7)
    run = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    run.validate(model, loader, verbose=False)
    model.eval()
    with torch.no_grad():
        scores = torch.cat(
            [
                (model.embed_with_flip(batch["gallery"]) * model.embed_with_flip(batch["probe"])).sum(1)
                for batch in loader.val_dataloader()
            ]
        )
    labels = torch.tensor([bool(pairs[index]["same"]) for index in range(len(pairs))])
    folded = ten_fold_accuracy(scores, labels, thresholds=thresholds)
    validation = kfold_val_at_far(scores, labels, far=1e-3)
    assert float(run.callback_metrics["val/synth/acc"]) == pytest.approx(folded["accuracy_mean"], abs=1e-6)
    assert float(run.callback_metrics["val/synth/kfold_val_at_far"]) == pytest.approx(validation["val_mean"], abs=1e-6)
    assert float(run.callback_metrics["val/synth/kfold_far"]) == pytest.approx(validation["far_mean"], abs=1e-6)


# ------------------------------------------------------------------------------------- AdaFace
def official_adaface(embeddings, weight, labels, state, m=0.4, h=0.333, s=64.0, t_alpha=0.01, eps=1e-3):
    """The official AdaFace head's formulas, one sample at a time (state: batch_mean, batch_std)."""
    norms = [min(max(math.sqrt(sum(v * v for v in row)), 0.001), 100.0) for row in embeddings.tolist()]
    batch_mean = sum(norms) / len(norms)
    batch_std = math.sqrt(sum((n - batch_mean) ** 2 for n in norms) / (len(norms) - 1))  # unbiased
    state["mean"] = t_alpha * batch_mean + (1 - t_alpha) * state["mean"]
    state["std"] = t_alpha * batch_std + (1 - t_alpha) * state["std"]
    centres = [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in weight.tolist()]
    logits = []
    for row, norm, label in zip(embeddings.tolist(), norms, labels.tolist()):
        unit = [v / math.sqrt(sum(c * c for c in row)) for v in row]
        margin_scaler = min(max((norm - state["mean"]) / (state["std"] + eps) * h, -1.0), 1.0)
        out = []
        for j, centre in enumerate(centres):
            cosine = min(max(sum(a * b for a, b in zip(unit, centre)), -1 + eps), 1 - eps)
            g_angular = -m * margin_scaler if j == label else 0.0
            theta = min(max(math.acos(cosine) + g_angular, eps), math.pi - eps)
            g_additive = m + m * margin_scaler if j == label else 0.0
            out.append(s * (math.cos(theta) - g_additive))
        logits.append(out)
    return torch.tensor(logits, dtype=torch.float64)


def test_adaface_equals_the_official_formulas_over_several_batches():
    generator = torch.Generator().manual_seed(0)
    head = AdaFaceHead(6, 5).train()
    with torch.no_grad():
        head.weight.copy_(torch.randn(5, 6, generator=generator))
    state = {"mean": 20.0, "std": 100.0}
    for step in range(3):
        embeddings = torch.randn(7, 6, generator=generator) * torch.tensor([0.0005, 1, 5, 20, 30, 150, 20.0]).unsqueeze(
            1
        )
        labels = torch.tensor([0, 1, 2, 3, 4, 0, 0])
        embeddings[6] = head.weight[0].detach() * 3  # on its label's centre: cosine clamped to 1 - 1e-3
        logits = head(embeddings, labels)
        expected = official_adaface(embeddings.double(), head.weight.detach().double(), labels, state)
        assert torch.allclose(logits.double(), expected, atol=2e-4, rtol=0), step
        assert head.norm_mean.item() == pytest.approx(state["mean"], rel=1e-6)
        assert head.norm_std.item() == pytest.approx(state["std"], rel=1e-6)


# -------------------------------------------------------------------------------------- ArcFace
def literal_arcface(cosine: float, m: float, fallback: bool) -> float:
    """The target logit / s: cos(theta + m), or cos(theta) - m sin(pi - m) where cos(theta) <= cos(pi - m)."""
    if fallback and cosine <= math.cos(math.pi - m):
        return cosine - m * math.sin(math.pi - m)
    return math.cos(math.acos(cosine) + m)


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("fallback", [False, True])
def test_arcface_options_equal_their_literal_definitions(fallback, straight_through):
    m, s = 0.5, 10.0
    angles = torch.tensor([0.3, 1.5, math.pi - m - 0.05, math.pi - m + 0.05, 3.0], dtype=torch.float64)
    embeddings = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).float().requires_grad_(True)
    head = ArcFaceHead(2, 2, scale=s, margin=m, fallback=fallback, straight_through=straight_through)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    labels = torch.zeros(5, dtype=torch.long)
    logits = head(embeddings, labels)
    cosines = embeddings.detach()[:, 0].double() / embeddings.detach().double().norm(dim=1)
    expected = torch.tensor([s * literal_arcface(float(c), m, fallback) for c in cosines.tolist()], dtype=torch.float64)
    assert torch.allclose(logits[:, 0].double(), expected, atol=1e-4)
    assert torch.allclose(logits[:, 1], s * embeddings.detach()[:, 1] / embeddings.detach().norm(dim=1), atol=1e-5)
    logits[:, 0].sum().backward()
    if straight_through:  # the gradient of s * cos(theta): d/dx of s * x / |x| at unit x
        plain = embeddings.detach().clone().requires_grad_(True)
        (s * plain[:, 0] / plain.norm(dim=1)).sum().backward()
        assert torch.allclose(embeddings.grad, plain.grad, atol=1e-5)
    else:  # d/dx of s * literal(x / |x|), by central differences in float64
        step = 1e-6
        for row in range(5):
            for axis in range(2):
                shift = torch.zeros(2, dtype=torch.float64)
                shift[axis] = step
                values = []
                for sign in (1, -1):
                    point = embeddings.detach()[row].double() + sign * shift
                    values.append(s * literal_arcface(float(point[0] / point.norm()), m, fallback))
                assert embeddings.grad[row, axis].item() == pytest.approx(
                    (values[0] - values[1]) / (2 * step), abs=1e-2
                )


def test_fallback_needs_m1_one_and_heads_take_the_options_from_a_spec():
    with pytest.raises(ValueError, match="fallback is defined for m1 = 1"):
        CombinedMarginHead(2, 2, m1=1.35, fallback=True)
    head = build_margin_head({"name": "arcface", "margin": 0.5, "straight_through": True, "fallback": True}, 4, 3)
    assert head.straight_through and head.fallback and "straight_through=True" in repr(head)


# --------------------------------------------------------------------------------------- recipe
def compose_train(*overrides, experiment="ms1m"):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


def test_recipe_power_margins_and_thresholds_are_config_values():
    config = compose_train()
    assert config.module.scheduler.power == 2.0 and config.module.thresholds == "insightface"
    assert dict(config.module.head) == {
        "name": "arcface",
        "scale": 64.0,
        "margin": 0.5,
        "fallback": False,
        "straight_through": False,
    }
    assert compose_train("module/head=cosface").module.head.margin == 0.35
    assert compose_train("module/head=cosface", "module.head.margin=0.4").module.head.margin == 0.4
    adaface = compose_train("module/head=adaface").module.head
    assert (adaface.margin, adaface.h, adaface.momentum, adaface.eps) == (0.4, 0.333, 0.01, 0.001)
    for name in ("arcface", "cosface", "adaface", "combined"):  # every head config builds its head
        spec = dict(compose_train(f"module/head={name}").module.head)
        assert build_margin_head(spec, 4, 3).scale == 64.0
    # power 1 (arcface_torch's train_v2.py) is linear, power 2 (its 2022 recipe) quadratic
    assert [polynomial_decay(step, 4, power=1.0) for step in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [polynomial_decay(step, 4, power=2.0) for step in range(5)] == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    with pytest.raises(ConfigError, match="module.thresholds"):
        check_train_config(compose_train("module.thresholds=midpoint", experiment="faces"))
    with pytest.raises(ValueError, match="thresholds must be one of"):
        FaceRecognizer({"arch": "small", "input_size": 32, "widths": [8, 8, 8, 8]}, None, 3, 8, thresholds="midpoint")


# ------------------------------------------------------------------------------------ citations
def test_corrrise_and_fggb_cite_lu_xu_and_ebrahimi():
    for path, venue in (("fame/explain/corrrise.py", "WACV 2024"), ("fame/explain/fggb.py", "FG 2024")):
        assert f"(Lu, Xu & Ebrahimi, {venue})" in (ROOT / path).read_text().splitlines()[0]
    sources = [
        path
        for folder in ("fame", "configs", "docs", "tests")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".yaml", ".md") and path.name != os.path.basename(__file__)
    ]
    assert sources and not [str(path) for path in sources if "Marcel" in path.read_text()]
