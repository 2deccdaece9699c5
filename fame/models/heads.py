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
            raise ValueError(f"expected one label per embedding, shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min().item()}..{labels.max().item()}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        cosine = cosine.clamp(-1 + self.eps, 1 - self.eps)
        is_target = F.one_hot(labels.long(), self.num_classes).bool()
        return cosine, is_target


class CombinedMarginHead(_CosineHead):
    """``s * (cos(m1 * theta_y + m2) - m3)`` for the label y, ``s * cos(theta_j)`` for the other classes.

    insightface's combined margin: ArcFace is (m1, m2, m3) = (1, 0.5, 0), CosFace (1, 0, 0.35),
    SphereFace-like margins use m1 > 1.
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
    ) -> None:
        super().__init__(embedding_size, num_classes, scale=scale, eps=eps)
        self.m1, self.m2, self.m3 = m1, m2, m3

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cosine, is_target = self.cosine(embeddings, labels)
        with_margin = torch.cos(self.m1 * torch.acos(cosine) + self.m2) - self.m3
        return self.scale * torch.where(is_target, with_margin, cosine)

    def extra_repr(self) -> str:
        return f"{self.num_classes} classes x {self.embedding_size}, scale={self.scale}, m=({self.m1}, {self.m2}, {self.m3})"


class ArcFaceHead(CombinedMarginHead):
    """ArcFace (Deng et al., CVPR 2019): additive angular margin, ``s * cos(theta_y + margin)``."""

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0, margin: float = 0.5) -> None:
        super().__init__(embedding_size, num_classes, scale=scale, m2=margin)


class CosFaceHead(CombinedMarginHead):
    """CosFace (Wang et al., CVPR 2018): additive cosine margin, ``s * (cos(theta_y) - margin)``."""

    def __init__(self, embedding_size: int, num_classes: int, *, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__(embedding_size, num_classes, scale=scale, m3=margin)


class AdaFaceHead(_CosineHead):
    """AdaFace (Kim et al., CVPR 2022): a margin that adapts to the image quality told by the feature norm.

    With ``n`` the embedding norm (clipped to [0.001, 100], no gradient) and ``mu``, ``sigma`` the
    running mean and standard deviation of ``n`` (an exponential moving average with weight
    ``momentum`` on the current batch, started from the first batch), the normalized norm is
    ``z = clip(h * (n - mu) / (sigma + eps), -1, 1)``; the label's logit becomes
    ``s * (cos(clip(theta_y - margin * z, 0, pi)) - (margin + margin * z))``.
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
        super().__init__(embedding_size, num_classes, scale=scale, eps=1e-7)
        self.margin = margin
        self.h = h
        self.momentum = momentum
        self.norm_eps = eps
        self.register_buffer("norm_mean", torch.zeros(()))
        self.register_buffer("norm_std", torch.ones(()))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cosine, is_target = self.cosine(embeddings, labels)
        norms = embeddings.detach().float().norm(dim=1).clamp(0.001, 100)
        if self.training:
            with torch.no_grad():
                batch_mean, batch_std = norms.mean(), norms.std(correction=0)
                weight = 1.0 if self.batches_seen == 0 else self.momentum
                self.norm_mean.lerp_(batch_mean, weight)
                self.norm_std.lerp_(batch_std, weight)
                self.batches_seen += 1
        quality = (self.h * (norms - self.norm_mean) / (self.norm_std + self.norm_eps)).clamp(-1, 1).unsqueeze(1)
        angle = (torch.acos(cosine) - self.margin * quality).clamp(0, math.pi)
        with_margin = torch.cos(angle) - (self.margin + self.margin * quality)
        return self.scale * torch.where(is_target, with_margin, cosine)
