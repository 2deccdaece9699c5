"""Face verification scores of similarity scores with genuine/impostor labels
(docs/method.md#face-recognition-protocol).

Every function takes similarity scores (N,) (higher = more alike, e.g. cosine similarity) and
labels (N,) (True / 1 = genuine pair, False / 0 = impostor pair).

Two threshold protocols:

- "exact" (EER, whole-set TAR@FAR, and the k-fold accuracy with ``thresholds="exact"``): a pair
  is accepted when ``score >= threshold``; thresholds are swept over the observed scores from
  high to low and where several are equally good the largest wins, so results do not depend on
  input order.
- "insightface" (the default of the k-fold accuracy, and :func:`kfold_val_at_far`): the
  protocol of insightface's verification code, which published LFW / CFP-FP / AgeDB numbers
  use. Scores are cosines of L2-normalized embeddings and become squared L2 distances
  ``d = 2 - 2 * score`` (float64); a pair is accepted when ``d < threshold`` (strictly), the
  thresholds being the grid ``numpy.arange(0, 4, 0.01)`` (``numpy.arange(0, 4, 0.001)`` for
  VAL@FAR).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: Threshold protocols of :func:`ten_fold_accuracy`.
THRESHOLD_PROTOCOLS = ("insightface", "exact")
#: insightface's candidate thresholds of the k-fold accuracy, in squared L2 distance.
INSIGHTFACE_ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
#: insightface's candidate thresholds of the k-fold VAL@FAR, in squared L2 distance.
INSIGHTFACE_VAL_THRESHOLDS = np.arange(0, 4, 0.001)


def _as_scores_and_labels(scores: Tensor, labels: Tensor, need_both: bool = True) -> tuple[Tensor, Tensor]:
    scores = torch.as_tensor(scores).detach().flatten().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().flatten().to("cpu")
    if scores.numel() != labels.numel():
        raise ValueError(f"scores and labels must have the same length, got {scores.numel()} and {labels.numel()}")
    if scores.numel() == 0:
        raise ValueError("scores are empty: verification metrics need at least one genuine and one impostor pair")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; check the embeddings that produced them")
    if labels.dtype != torch.bool:
        if not torch.isin(labels, torch.tensor([0, 1], dtype=labels.dtype)).all():
            raise ValueError("labels must be boolean or 0/1 (1 = genuine pair, 0 = impostor pair)")
        labels = labels.bool()
    if need_both:
        genuine = int(labels.sum())
        if genuine == labels.numel():
            raise ValueError(f"all {genuine} pairs are genuine: FAR needs at least one impostor pair as well")
        if genuine == 0:
            raise ValueError(f"all {labels.numel()} pairs are impostors: FRR needs at least one genuine pair as well")
    return scores, labels


def roc_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(thresholds, far, tar) at every distinct score, thresholds in decreasing order.

    far[i] = share of impostor pairs with score >= thresholds[i] (false accept rate);
    tar[i] = share of genuine pairs with score >= thresholds[i] (true accept rate = 1 - FRR).
    All three are float64 tensors on the CPU.
    """
    scores, labels = _as_scores_and_labels(scores, labels)
    thresholds = torch.unique(scores).flip(0)
    genuine = torch.sort(scores[labels]).values
    impostor = torch.sort(scores[~labels]).values
    accepted_genuine = genuine.numel() - torch.searchsorted(genuine, thresholds, side="left")
    accepted_impostor = impostor.numel() - torch.searchsorted(impostor, thresholds, side="left")
    return thresholds, accepted_impostor.double() / impostor.numel(), accepted_genuine.double() / genuine.numel()


def eer_threshold(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """(threshold, eer): the equal error rate operating point of the scores.

    Candidates are the distinct scores swept from high to low; the EER is (FAR + FRR) / 2 at the
    candidate where |FAR - FRR| is smallest (ties go to the largest). The threshold returned lies
    midway between that candidate and the next lower distinct score (below the lowest score by
    half the gap above it): ``score >= threshold`` decides these scores exactly as the candidate
    does, and a pair whose score is the candidate keeps its decision when the score is recomputed
    with rounding differences (another batch size, another device).
    """
    thresholds, far, tar = roc_curve(scores, labels)
    frr = 1.0 - tar
    best = int(torch.argmin((far - frr).abs()))  # first minimum = largest threshold
    eer = float((far[best] + frr[best]) / 2)
    if best + 1 < thresholds.numel():
        return float((thresholds[best] + thresholds[best + 1]) / 2), eer
    if best > 0:
        return float(thresholds[best] - (thresholds[best - 1] - thresholds[best]) / 2), eer
    return float(thresholds[best]), eer


def tar_at_far(scores: Tensor, labels: Tensor, far: float = 1e-3) -> float:
    """True accept rate at the lowest threshold whose false accept rate is at most ``far``.

    With fewer than 1 / far impostor pairs this means no impostor accepted at all (the
    threshold is just above the highest impostor score).
    """
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must lie in [0, 1], got {far}")
    thresholds, false_accept, true_accept = roc_curve(scores, labels)
    allowed = torch.nonzero(false_accept <= far + 1e-12).flatten()
    if allowed.numel() == 0:  # even the highest score admits too many impostors: reject everything
        return 0.0
    return float(true_accept[allowed[-1]])  # FAR grows as the threshold falls: last allowed = lowest


def accuracy_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> float:
    """Share of pairs decided correctly when pairs with score >= threshold are accepted."""
    scores, labels = _as_scores_and_labels(scores, labels, need_both=False)
    return float(((scores >= threshold) == labels).double().mean())


def best_accuracy_threshold(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """(threshold, accuracy) maximising the accuracy of ``score >= threshold`` decisions.

    Candidates are +inf (reject every pair), the midpoints between consecutive distinct scores
    and -inf (accept every pair): one threshold per distinct decision, placed in the middle of
    its gap so it carries over to held-out pairs. They are swept from high to low and ties go to
    the largest threshold.
    """
    scores, labels = _as_scores_and_labels(scores, labels, need_both=False)
    distinct = torch.unique(scores).flip(0)
    infinity = torch.tensor([float("inf")], dtype=scores.dtype)
    thresholds = torch.cat([infinity, (distinct[1:] + distinct[:-1]) / 2, -infinity])
    genuine = torch.sort(scores[labels]).values
    impostor = torch.sort(scores[~labels]).values
    accepted_genuine = genuine.numel() - torch.searchsorted(genuine, thresholds, side="left")
    rejected_impostor = torch.searchsorted(impostor, thresholds, side="left")
    accuracy = (accepted_genuine + rejected_impostor).double() / scores.numel()
    best = int(torch.argmax(accuracy))  # first maximum = largest threshold
    return float(thresholds[best]), float(accuracy[best])


def fold_bounds(num_pairs: int, folds: int = 10) -> list[tuple[int, int]]:
    """Contiguous (start, stop) slices of the pair list, the first ``num_pairs % folds`` folds one
    pair longer (sklearn's unshuffled KFold, as in insightface's verification code)."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if num_pairs < folds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {folds} folds; use fewer folds or more pairs")
    base, extra = divmod(num_pairs, folds)
    bounds, start = [], 0
    for fold in range(folds):
        stop = start + base + (1 if fold < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def squared_distances(scores: Tensor) -> Tensor:
    """Squared L2 distances ``2 - 2 * score`` (float64) between unit vectors of cosine ``score``."""
    return 2.0 - 2.0 * torch.as_tensor(scores).to("cpu", torch.float64)


def _accepted_below(distances: Tensor, thresholds: Tensor) -> Tensor:
    """How many of ``distances`` lie strictly below each threshold (accepted pairs)."""
    return torch.searchsorted(torch.sort(distances).values, thresholds, side="left")


def _fold_masks(num_pairs: int, folds: int) -> list[Tensor]:
    masks = []
    for start, stop in fold_bounds(num_pairs, folds):
        held_out = torch.zeros(num_pairs, dtype=torch.bool)
        held_out[start:stop] = True
        masks.append(held_out)
    return masks


def _insightface_fold_accuracies(scores: Tensor, labels: Tensor, folds: int) -> tuple[Tensor, Tensor]:
    """Per fold: the grid threshold with the best accuracy on the other folds (first maximum =
    smallest distance) and the held-out fold's accuracy at it."""
    thresholds = torch.from_numpy(INSIGHTFACE_ACCURACY_THRESHOLDS)
    distances = squared_distances(scores)
    accuracies, chosen = [], []
    for held_out in _fold_masks(scores.numel(), folds):
        genuine, impostor = distances[~held_out & labels], distances[~held_out & ~labels]
        correct = _accepted_below(genuine, thresholds) + impostor.numel() - _accepted_below(impostor, thresholds)
        threshold = float(thresholds[int(torch.argmax(correct))])  # counts rank like accuracies
        chosen.append(threshold)
        accuracies.append(float(((distances[held_out] < threshold) == labels[held_out]).double().mean()))
    return torch.tensor(accuracies, dtype=torch.float64), torch.tensor(chosen, dtype=torch.float64)


def _exact_fold_accuracies(scores: Tensor, labels: Tensor, folds: int) -> tuple[Tensor, Tensor]:
    accuracies, chosen = [], []
    for held_out in _fold_masks(scores.numel(), folds):
        threshold, _ = best_accuracy_threshold(scores[~held_out], labels[~held_out])
        chosen.append(threshold)
        accuracies.append(accuracy_at_threshold(scores[held_out], labels[held_out], threshold))
    return torch.tensor(accuracies, dtype=torch.float64), torch.tensor(chosen, dtype=torch.float64)


def ten_fold_accuracy(scores: Tensor, labels: Tensor, folds: int = 10, thresholds: str = "insightface") -> dict:
    """The standard LFW / insightface k-fold verification accuracy.

    The pair list is cut into ``folds`` contiguous folds (:func:`fold_bounds`); for each fold the
    threshold with the best accuracy on the other folds is applied to the held-out fold.

    ``thresholds="insightface"`` (default) searches insightface's grid
    ``numpy.arange(0, 4, 0.01)`` of squared L2 distances ``2 - 2 * score``, accepting
    ``distance < threshold``; where several grid points tie on the training folds the first
    (smallest distance) wins. ``thresholds="exact"`` searches one threshold per distinct decision
    of the training folds' scores (:func:`best_accuracy_threshold`: midpoints between
    consecutive distinct scores, accepting ``score >= threshold``, ties to the largest).

    Returns ``accuracy_mean`` and ``accuracy_std`` (population std over folds, like
    ``numpy.std``) and the per-fold ``accuracies`` and ``thresholds`` (float64 tensors: squared
    distances for "insightface"; similarities for "exact", where +inf / -inf means rejecting /
    accepting every pair was best on that fold's training part).
    """
    if thresholds not in THRESHOLD_PROTOCOLS:
        raise ValueError(f"thresholds must be one of {THRESHOLD_PROTOCOLS}, got {thresholds!r}")
    scores, labels = _as_scores_and_labels(scores, labels, need_both=False)
    fold_accuracies = _insightface_fold_accuracies if thresholds == "insightface" else _exact_fold_accuracies
    accuracies, chosen = fold_accuracies(scores, labels, folds)
    return {
        "accuracy_mean": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std(unbiased=False)),
        "accuracies": accuracies,
        "thresholds": chosen,
    }


def _interpolated_threshold(train_far: Tensor, thresholds: Tensor, far: float) -> float:
    """The threshold where the piecewise-linear FAR(threshold) of the training folds reaches ``far``.

    ``train_far`` does not decrease along ``thresholds``. Between the last grid point of the
    largest FAR value below ``far`` and the first grid point of the next FAR value the
    threshold is interpolated linearly; where a FAR value equals ``far`` its last grid point is
    taken (its first one when it is the largest FAR value). If no grid point reaches ``far`` the
    threshold is 0 (nothing accepted). This is the degree-1 spline of scipy's
    ``interp1d(train_far, thresholds, kind="slinear")`` that insightface's ``calculate_val``
    evaluates, except at the largest FAR value when several grid points share it, where that
    spline evaluates to 0 (and current scipy refuses repeated FAR values altogether).
    """
    highest = float(train_far[-1])
    if highest < far:
        return 0.0
    if far == highest:
        return float(thresholds[int(torch.searchsorted(train_far, train_far[-1:], side="left"))])
    below = int(torch.searchsorted(train_far, torch.tensor([far], dtype=train_far.dtype), side="right")) - 1
    low_far, high_far = float(train_far[below]), float(train_far[below + 1])
    if low_far == far:
        return float(thresholds[below])
    low, high = float(thresholds[below]), float(thresholds[below + 1])
    return low + (high - low) * (far - low_far) / (high_far - low_far)


def kfold_val_at_far(scores: Tensor, labels: Tensor, far: float = 1e-3, folds: int = 10) -> dict:
    """insightface's k-fold interpolated VAL@FAR (validation rate at a false accept rate).

    For each fold, the FAR of the other folds is computed at every threshold of the grid
    ``numpy.arange(0, 4, 0.001)`` of squared L2 distances ``2 - 2 * score`` (a pair is accepted
    when ``distance < threshold``); the threshold where that FAR reaches ``far`` is found by
    linear interpolation (:func:`_interpolated_threshold`); the held-out fold's VAL (share of
    genuine pairs accepted) and FAR at that threshold are recorded. Unlike :func:`tar_at_far`,
    which reads the whole set's ROC, the threshold is fixed on 9 folds and applied to the 10th.

    Returns ``val_mean``, ``val_std`` (population std over folds), ``far_mean`` and the per-fold
    ``vals``, ``fars`` and ``thresholds`` (float64 tensors). A held-out fold without genuine
    (impostor) pairs has VAL (FAR) 0.
    """
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must lie in [0, 1], got {far}")
    scores, labels = _as_scores_and_labels(scores, labels)
    thresholds = torch.from_numpy(INSIGHTFACE_VAL_THRESHOLDS)
    distances = squared_distances(scores)
    vals, fars, chosen = [], [], []
    for held_out in _fold_masks(scores.numel(), folds):
        train_impostors = distances[~labels & ~held_out]
        train_far = _accepted_below(train_impostors, thresholds).double() / max(train_impostors.numel(), 1)
        threshold = _interpolated_threshold(train_far, thresholds, far)
        test_accepted = distances[held_out] < threshold
        test_labels = labels[held_out]
        vals.append(float(test_accepted[test_labels].sum()) / max(int(test_labels.sum()), 1))
        fars.append(float(test_accepted[~test_labels].sum()) / max(int((~test_labels).sum()), 1))
        chosen.append(threshold)
    vals = torch.tensor(vals, dtype=torch.float64)
    fars = torch.tensor(fars, dtype=torch.float64)
    return {
        "val_mean": float(vals.mean()),
        "val_std": float(vals.std(unbiased=False)),
        "far_mean": float(fars.mean()),
        "vals": vals,
        "fars": fars,
        "thresholds": torch.tensor(chosen, dtype=torch.float64),
    }


def verification_report(
    scores: Tensor, labels: Tensor, folds: int = 10, far: float = 1e-3, thresholds: str = "insightface"
) -> dict[str, float]:
    """Every face-recognition number for one verification set: ``accuracy_mean``,
    ``accuracy_std`` (k-fold, :func:`ten_fold_accuracy` with ``thresholds``), ``eer``,
    ``eer_threshold``, ``tar_at_far`` (whole-set ROC, :func:`tar_at_far`) and insightface's
    k-fold ``kfold_val_at_far``, ``kfold_val_std`` and ``kfold_far`` (:func:`kfold_val_at_far`)."""
    folded = ten_fold_accuracy(scores, labels, folds, thresholds)
    threshold, eer = eer_threshold(scores, labels)
    validation = kfold_val_at_far(scores, labels, far, folds)
    return {
        "accuracy_mean": folded["accuracy_mean"],
        "accuracy_std": folded["accuracy_std"],
        "eer": eer,
        "eer_threshold": threshold,
        "tar_at_far": tar_at_far(scores, labels, far),
        "kfold_val_at_far": validation["val_mean"],
        "kfold_val_std": validation["val_std"],
        "kfold_far": validation["far_mean"],
    }
