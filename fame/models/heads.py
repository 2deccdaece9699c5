"""Margin heads that turn face embeddings into logits for cross-entropy training.

Each head holds the class centres ``weight`` (num_classes x embedding_size) and computes the
cosine ``cos(theta_j)`` between the L2-normalized embedding and every normalized centre. The
cosine is clamped to [-1 + eps, 1 - eps] so that ``arccos`` and its gradient stay finite at
theta = 0 and theta = pi; everything runs in float32, also under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _CosineHead(nn.Module):
    """Class centres and the clamped cosine between embeddings and centres."""

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float, eps: float) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.scale = scale
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, num_classes) clamped cosines and the (B, num_classes) boolean mask of each row's label."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"expected embeddings of shape (B, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"expected one label per embedding, shape ({embeddings.shape[0]},), got {tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}"
            )
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        cosine = cosine.clamp(-1 + self.eps, 1 - self.eps)
        is_target = F.one_hot(labels.long(), self.num_classes).bool()
        return cosine, is_target


class CombinedMarginHead(_CosineHead):
    """``s * (cos(m1 * theta_y + m2) - m3)`` for the label y, ``s * cos(theta_j)`` for the other classes.

    insightface's combined margin: ArcFace is (m1, m2, m3) = (1, 0.5, 0), CosFace (1, 0, 0.35),
    SphereFace-like margins use m1 > 1.

    Two options change the label's logit ``t = cos(theta_y)`` (both off by default: the margin is
    differentiated like any other function of the cosine):

    - ``fallback`` (needs m1 = 1): where ``t <= cos(pi - m2)``, i.e. ``theta_y >= pi - m2`` so
      that ``theta_y + m2`` would pass pi and the logit would rise again, the logit is
      ``t - m2 * sin(pi - m2) - m3`` instead of ``cos(theta_y + m2) - m3``. This is the
      non-"easy margin" form of the original ArcFace recipe (InsightFace's MXNet code).
    - ``straight_through``: the logit keeps the margin's value but takes the gradient of
      ``t`` itself (``t + (value - t).detach()``), as arcface_torch's current ArcFace loss
      does by applying ``arccos``, ``+ m2`` and ``cos`` under ``torch.no_grad`` (without the
      fallback).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        eps: float = 1e-7,
        fallback: bool = False,
        straight_through: bool = False,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale=scale, eps=eps)
        if fallback and m1 != 1.0:
            raise ValueError(f"fallback is defined for m1 = 1 (ArcFace, CosFace), got m1={m1}; set fallback=false")
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.fallback = fallback
        self.straight_through = straight_through

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cosine, is_target = self.cosine(embeddings, labels)
        with_margin = torch.cos(self.m1 * torch.acos(cosine) + self.m2) - self.m3
        if self.fallback:
            past_pi = cosine <= math.cos(math.pi - self.m2)
            with_margin = torch.where(past_pi, cosine - self.m2 * math.sin(math.pi - self.m2) - self.m3, with_margin)
        if self.straight_through:
            with_margin = cosine + (with_margin - cosine).detach()
        return self.scale * torch.where(is_target, with_margin, cosine)

    def extra_repr(self) -> str:
        options = "".join(f", {name}=True" for name in ("fallback", "straight_through") if getattr(self, name))
        return (
            f"{self.num_classes} classes x {self.embedding_size}, scale={self.scale}, "
            f"m=({self.m1}, {self.m2}, {self.m3}){options}"
        )


class ArcFaceHead(CombinedMarginHead):
    """ArcFace (Deng et al., CVPR 2019): additive angular margin, ``s * cos(theta_y + margin)``.

    By default the margin is differentiated through. The original recipe (InsightFace's MXNet
    code) also differentiated through it and used the fallback ``cos(theta_y) - margin *
    sin(pi - margin)`` where ``theta_y >= pi - margin`` (``fallback=True``); arcface_torch's
    current loss applies the margin straight-through, without the fallback
    (``straight_through=True``). See :class:`CombinedMarginHead` for both definitions.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.5,
        fallback: bool = False,
        straight_through: bool = False,
    ) -> None:
        super().__init__(
            embedding_size, num_classes, scale=scale, m2=margin, fallback=fallback, straight_through=straight_through
        )


class CosFaceHead(CombinedMarginHead):
    """CosFace (Wang et al., CVPR 2018): additive cosine margin, ``s * (cos(theta_y) - margin)``.

    The default margin 0.35 is the CosFace paper's; arcface_torch's CosFace configs use 0.4.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__(embedding_size, num_classes, scale=scale, m3=margin)


class AdaFaceHead(_CosineHead):
    """AdaFace (Kim et al., CVPR 2022): a margin that adapts to the image quality told by the feature norm.

    The formulas of the authors' official head:

    - the cosine is clamped to [-1 + eps, 1 - eps] (eps = 1e-3);
    - ``n``, the embedding norms clipped to [0.001, 100] and detached;
    - in training, the buffers ``norm_mean`` (starts at 20) and ``norm_std`` (starts at 100)
      move to ``momentum * batch + (1 - momentum) * buffer`` (t_alpha, 0.01) with the batch's
      mean and unbiased std (``torch.std``) of ``n``, before they are used (a one-sample batch,
      which has no unbiased std, leaves ``norm_std`` unchanged);
    - ``z = clip((n - norm_mean) / (norm_std + eps) * h, -1, 1)``;
    - for the label y the angle is ``clip(theta_y - margin * z, eps, pi - eps)`` (g_angular =
      -margin * z) and ``margin + margin * z`` (g_additive) is subtracted from its cosine; the
      other classes keep ``cos(clip(theta_j, eps, pi - eps))``; all logits are scaled by ``s``.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        momentum: float = 0.01,
        eps: float = 1e-3,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale=scale, eps=eps)
        self.margin = margin
        self.h = h
        self.momentum = momentum
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cosine, is_target = self.cosine(embeddings, labels)
        norms = embeddings.detach().float().norm(dim=1).clamp(0.001, 100)
        if self.training:
            with torch.no_grad():
                self.norm_mean.copy_(self.momentum * norms.mean() + (1 - self.momentum) * self.norm_mean)
                if norms.numel() > 1:
                    self.norm_std.copy_(self.momentum * norms.std() + (1 - self.momentum) * self.norm_std)
        quality = ((norms - self.norm_mean) / (self.norm_std + self.eps) * self.h).clamp(-1, 1).unsqueeze(1)
        angular = torch.where(is_target, -self.margin * quality, torch.zeros_like(cosine))
        angle = (torch.acos(cosine) + angular).clamp(self.eps, math.pi - self.eps)
        additive = torch.where(is_target, self.margin + self.margin * quality, torch.zeros_like(cosine))
        return self.scale * (torch.cos(angle) - additive)
