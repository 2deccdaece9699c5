"""Margin heads: exact logits on 2-d embeddings at known angles, finite gradients at theta = 0 and pi."""

from __future__ import annotations

import math

import pytest
import torch

from fame.models import AdaFaceHead, ArcFaceHead, CombinedMarginHead, CosFaceHead

SQRT3_2 = math.sqrt(3) / 2
CENTRES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # class k at 0, 90 and 180 degrees


def with_centres(head):
    with torch.no_grad():
        head.weight.copy_(CENTRES * torch.tensor([[2.0], [0.5], [1.0]]))  # centre norms must not matter
    return head


# sample 0: norm 2 at 30 degrees, label 0 (theta_y = 30 deg);
# sample 1: norm 1 at 270 degrees, label 2 (theta_y = 90 deg)
EMBEDDINGS = torch.tensor([[2 * SQRT3_2, 1.0], [0.0, -1.0]])
LABELS = torch.tensor([0, 2])
COSINES = torch.tensor([[SQRT3_2, 0.5, -SQRT3_2], [0.0, -1.0, 0.0]])


def expected(scale: float, target_0: float, target_1: float) -> torch.Tensor:
    logits = COSINES.clone()
    logits[0, 0], logits[1, 2] = target_0, target_1
    return scale * logits


def test_arcface_adds_an_angle() -> None:
    head = with_centres(ArcFaceHead(2, 3))
    assert (head.m1, head.m2, head.m3, head.scale) == (1.0, 0.5, 0.0, 64.0)
    target = expected(64, math.cos(math.pi / 6 + 0.5), math.cos(math.pi / 2 + 0.5))
    assert torch.allclose(head(EMBEDDINGS, LABELS), target, atol=1e-4)


def test_cosface_subtracts_from_the_cosine() -> None:
    head = with_centres(CosFaceHead(2, 3))
    assert (head.m1, head.m2, head.m3) == (1.0, 0.0, 0.35)
    assert torch.allclose(head(EMBEDDINGS, LABELS), expected(64, SQRT3_2 - 0.35, -0.35), atol=1e-4)


def test_combined_margin_definition() -> None:
    head = with_centres(CombinedMarginHead(2, 3, scale=10, m1=2.0, m2=0.1, m3=0.2))
    target = expected(10, math.cos(2 * math.pi / 6 + 0.1) - 0.2, math.cos(2 * math.pi / 2 + 0.1) - 0.2)
    assert torch.allclose(head(EMBEDDINGS, LABELS), target, atol=1e-5)


def test_no_margin_is_the_scaled_cosine() -> None:
    head = with_centres(CombinedMarginHead(2, 3, scale=1.0))
    assert torch.allclose(head(EMBEDDINGS, LABELS), COSINES, atol=1e-6)


@pytest.mark.parametrize(
    "head",
    [ArcFaceHead(2, 3), CosFaceHead(2, 3), CombinedMarginHead(2, 3, m1=1.35, m2=0.25, m3=0.1), AdaFaceHead(2, 3)],
    ids=["arcface", "cosface", "combined", "adaface"],
)
def test_finite_at_theta_zero_and_pi(head) -> None:
    with_centres(head)
    # on the centre of the label (theta = 0) and opposite it (theta = pi), in float32 and float64 inputs
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 0.7], [1.0, 0.0], [-2.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    logits = head(embeddings, labels)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()
    double = head(embeddings.detach().double(), labels)
    assert double.dtype == torch.float32 and torch.isfinite(double).all()


def test_arcface_at_theta_zero_is_the_margin_at_the_clamped_cosine() -> None:
    head = with_centres(ArcFaceHead(2, 3))
    logits = head(torch.tensor([[5.0, 0.0]]), torch.tensor([0]))
    clamped = torch.tensor(1 - 1e-7, dtype=torch.float32).item()  # 1 - 2**-23 in float32: theta = 4.9e-4
    assert logits[0, 0].item() == pytest.approx(64 * math.cos(math.acos(clamped) + 0.5), abs=1e-4)


def test_label_and_shape_errors() -> None:
    head = ArcFaceHead(4, 3)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        head(torch.rand(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        head(torch.rand(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one label per embedding"):
        head(torch.rand(2, 4), torch.tensor([0]))


def test_adaface_margin_follows_the_feature_norm() -> None:
    head = with_centres(AdaFaceHead(2, 3, scale=10.0, margin=0.4, h=0.333))
    assert head.norm_mean.item() == 20.0 and head.norm_std.item() == 100.0
    # norms 1 and 3: batch mean 2, unbiased std sqrt(2); the buffers move 1 % of the way from 20 / 100
    embeddings = torch.tensor([[SQRT3_2, 0.5], [0.0, -3.0]])
    logits = head.train()(embeddings, LABELS)
    mean, std = 0.01 * 2 + 0.99 * 20, 0.01 * math.sqrt(2) + 0.99 * 100
    assert head.norm_mean.item() == pytest.approx(mean) and head.norm_std.item() == pytest.approx(std)
    quality = [(1 - mean) / (std + 1e-3) * 0.333, (3 - mean) / (std + 1e-3) * 0.333]
    target_0 = math.cos(math.pi / 6 - 0.4 * quality[0]) - (0.4 + 0.4 * quality[0])
    target_1 = math.cos(math.pi / 2 - 0.4 * quality[1]) - (0.4 + 0.4 * quality[1])
    want = expected(10.0, target_0, target_1)
    want[1, 1] = 10.0 * (-1 + 1e-3)  # cosine -1 clamped to -(1 - 1e-3)
    assert torch.allclose(logits, want, atol=1e-5)
    # eval mode leaves the statistics alone
    head.eval()(torch.tensor([[50.0, 0.0]]), torch.tensor([0]))
    assert head.norm_mean.item() == pytest.approx(mean) and head.norm_std.item() == pytest.approx(std)


def test_adaface_quality_is_clipped() -> None:
    head = with_centres(AdaFaceHead(2, 3, scale=1.0, margin=0.4)).eval()
    head.norm_mean.fill_(0.0)
    head.norm_std.fill_(1.0)  # norm 100 -> z = 100 / 1.001 * 0.333, clipped to 1
    logits = head(torch.tensor([[100.0, 0.0]]), torch.tensor([1]))  # theta_y = 90 deg
    assert logits[0, 1].item() == pytest.approx(math.cos(math.pi / 2 - 0.4) - 0.8, abs=1e-5)
