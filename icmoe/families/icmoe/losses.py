"""Losses: binary cross-entropy, soft Dice, and semantic-guided contrastive learning (SgCL).

SgCL shapes the experts' features during training (inference never computes it).
y_e, fg_e, bg_e are expert e's features of the image, of its foreground only and
of its background only; W1, W2, W3 are learned 1x1 projections whose outputs are
L2-normalised over channels, and d is the mean absolute difference:
  L1 (maximise)  mean over experts 0..3 of d(W1 fg_e, W1 bg_e)
  L2 (minimise)  mean over experts 1, 2, 3 of d(W2 y_e, W2 y_0)   (weight preservation)
  L3 (maximise)  mean over experts 1, 3 of d(W3 y_e, W3 y_2)      (complementarity)
  L_sgcl = L2 / (L1 + L3 + eps); expert 3 is the mean of experts 0..2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits (B, 1, H, W) against a 0/1 target."""
    return F.binary_cross_entropy_with_logits(logits, target.float())


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, 1 - mean per-image soft Dice, on logits (B, 1, H, W)."""
    p = torch.sigmoid(logits).flatten(1)  # (B, HW)
    t = target.float().flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def _with_mean(feats: Sequence[torch.Tensor]) -> list:
    """(y0, y1, y2) -> [y0, y1, y2, y3] with y3 the mean of the three."""
    return list(feats) + [torch.stack(list(feats), 0).mean(0)]


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


@dataclass
class SgCLTerms:
    l1: torch.Tensor  # foreground/background separation (to maximise)
    l2: torch.Tensor  # distance of experts 1, 2, 3 to the basic expert (to minimise)
    l3: torch.Tensor  # distance of experts 1, 3 to the adaptive expert (to maximise)
    loss: torch.Tensor  # l2 / (l1 + l3 + eps)


class SgCL(nn.Module):
    """SgCL with its three learned 1x1 projections W1, W2, W3."""

    def __init__(self, *, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.w1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.w2 = nn.Conv2d(channels, channels, kernel_size=1)
        self.w3 = nn.Conv2d(channels, channels, kernel_size=1)
        self.eps = eps

    @staticmethod
    def _proj(w: nn.Conv2d, y: torch.Tensor) -> torch.Tensor:
        return F.normalize(w(y), dim=1)  # (B, C, h, w), unit norm over channels

    def terms(
        self,
        features: Sequence[torch.Tensor],
        fg_features: Sequence[torch.Tensor],
        bg_features: Sequence[torch.Tensor],
    ) -> SgCLTerms:
        """Arguments: image, foreground and background features of experts 0..2, each (B, C, h, w)."""
        y, fg, bg = _with_mean(features), _with_mean(fg_features), _with_mean(bg_features)
        l1 = torch.stack([_distance(self._proj(self.w1, f), self._proj(self.w1, b)) for f, b in zip(fg, bg)]).mean()
        base = self._proj(self.w2, y[0])
        l2 = torch.stack([_distance(self._proj(self.w2, y[e]), base) for e in (1, 2, 3)]).mean()
        adaptive = self._proj(self.w3, y[2])
        l3 = torch.stack([_distance(self._proj(self.w3, y[e]), adaptive) for e in (1, 3)]).mean()
        return SgCLTerms(l1, l2, l3, l2 / (l1 + l3 + self.eps))

    def forward(self, features, fg_features, bg_features) -> torch.Tensor:
        return self.terms(features, fg_features, bg_features).loss


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0  # a: binary cross-entropy weight
    dice: float = 1.0  # b: soft Dice weight
    sgcl: float = 0.1  # g: SgCL weight (the paper gives no value)


def total_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    sgcl_loss: torch.Tensor | None = None,
    weights: LossWeights = LossWeights(),
) -> Dict[str, torch.Tensor]:
    """a * CE + b * Dice + g * L_sgcl on the final logits; returns the parts and `loss`."""
    parts = {"ce": bce_loss(logits, target), "dice": dice_loss(logits, target)}
    loss = weights.ce * parts["ce"] + weights.dice * parts["dice"]
    if sgcl_loss is not None:
        parts["sgcl"] = sgcl_loss
        loss = loss + weights.sgcl * sgcl_loss
    parts["loss"] = loss
    return parts
