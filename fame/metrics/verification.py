"""Face verification scores of similarity scores with genuine/impostor labels (DESIGN.md sec. 3).

Every function takes similarity scores (N,) (higher = more alike, e.g. cosine similarity) and
labels (N,) (True / 1 = genuine pair, False / 0 = impostor pair). A pair is accepted when
``score >= threshold``. Thresholds are swept over the observed scores from high to low; where
several thresholds are equally good the largest wins, so results do not depend on input order.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def ten_fold_accuracy(scores: Tensor, labels: Tensor, folds: int = 10) -> dict:
    """The standard LFW / insightface k-fold verification accuracy.

    The pair list is cut into ``folds`` contiguous folds; for each fold the threshold with the best
    accuracy on the other folds (:func:`best_accuracy_threshold`) is applied to the held-out fold.
    Returns ``accuracy_mean`` and ``accuracy_std`` (population std over folds, like
    ``numpy.std``) and the per-fold ``accuracies`` and ``thresholds`` (float64 tensors; a
    threshold of +inf / -inf means rejecting / accepting every pair was best on that fold's
    training part).
    """
    scores, labels = _as_scores_and_labels(scores, labels, need_both=False)
    accuracies, thresholds = [], []
    for start, stop in fold_bounds(scores.numel(), folds):
        held_out = torch.zeros(scores.numel(), dtype=torch.bool)
        held_out[start:stop] = True
        threshold, _ = best_accuracy_threshold(scores[~held_out], labels[~held_out])
        thresholds.append(threshold)
        accuracies.append(accuracy_at_threshold(scores[held_out], labels[held_out], threshold))
    accuracies = torch.tensor(accuracies, dtype=torch.float64)
    thresholds = torch.tensor(thresholds, dtype=torch.float64)
    return {
        "accuracy_mean": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std(unbiased=False)),
        "accuracies": accuracies,
        "thresholds": thresholds,
    }


def verification_report(scores: Tensor, labels: Tensor, folds: int = 10, far: float = 1e-3) -> dict[str, float]:
    """Every face-recognition number of DESIGN.md sec. 3 for one verification set:
    ``accuracy_mean``, ``accuracy_std`` (k-fold), ``eer``, ``eer_threshold`` and ``tar_at_far``."""
    folded = ten_fold_accuracy(scores, labels, folds)
    threshold, eer = eer_threshold(scores, labels)
    return {
        "accuracy_mean": folded["accuracy_mean"],
        "accuracy_std": folded["accuracy_std"],
        "eer": eer,
        "eer_threshold": threshold,
        "tar_at_far": tar_at_far(scores, labels, far),
    }
