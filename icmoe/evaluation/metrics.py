"""Segmentation metrics at threshold 0.5: DSC, IoU, accuracy, recall, precision.

Details: docs/evaluation.md.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

METRICS = ("dsc", "iou", "accuracy", "recall", "precision")


def confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image confusion counts.

    Arguments:
      pred: predicted mask (B, 1, H, W), any dtype; foreground is > 0.5.
      target: ground truth (B, 1, H, W); foreground is > 0.5.

    Returns:
      (B, 4) float64 tensor of TP, FP, FN, TN.
    """
    p = (pred.float() > 0.5).flatten(1)
    t = (target.float() > 0.5).flatten(1)
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = (~p & ~t).sum(1)
    return torch.stack([tp, fp, fn, tn], 1).double()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # 0/0 -> 1: nothing to find and nothing claimed is a perfect score.
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.ones_like(num))


def metrics_from_counts(counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """DSC, IoU, accuracy, recall, precision from (..., 4) TP/FP/FN/TN counts."""
    tp, fp, fn, tn = counts.unbind(-1)
    return {
        "dsc": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
    }


class MetricAccumulator:
    """Collects per-image confusion counts; `compute()` gives pooled and per-image metrics."""

    def __init__(self) -> None:
        self._counts = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns its per-image DSC (B,)."""
        c = confusion(pred, target).cpu()
        self._counts.append(c)
        return metrics_from_counts(c)["dsc"]

    def counts(self) -> torch.Tensor:
        """(N, 4) per-image counts gathered so far."""
        return torch.cat(self._counts) if self._counts else torch.zeros(0, 4, dtype=torch.float64)

    def merge(self, counts: torch.Tensor) -> None:
        self._counts.append(counts.double().cpu())

    def __len__(self) -> int:
        return int(self.counts().shape[0])

    def compute(self, counts: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, float]]:
        """{"pooled": {metric: value}, "per_image": {metric: mean}, "n_images": N}."""
        c = self.counts() if counts is None else counts
        if c.shape[0] == 0:
            raise ValueError("no images were evaluated")
        pooled = metrics_from_counts(c.sum(0))
        per = metrics_from_counts(c)
        return {
            "pooled": {k: float(pooled[k]) for k in METRICS},
            "per_image": {k: float(per[k].mean()) for k in METRICS},
            "n_images": int(c.shape[0]),
        }


def format_metrics(result: Dict[str, Dict[str, float]]) -> str:
    """Two aligned lines, pooled and per-image, e.g. for a console report."""
    head = "           " + " ".join(f"{k:>9}" for k in METRICS)
    lines = [head]
    for kind in ("pooled", "per_image"):
        lines.append(f"{kind:<10} " + " ".join(f"{result[kind][k]:9.4f}" for k in METRICS))
    return "\n".join(lines)
