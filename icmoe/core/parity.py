"""Parity measures of an engine's outputs against a reference: the pieces every family's gates use.

Logits are judged element by element, |candidate - reference| <= atol + rtol * |reference|
(NumPy's `isclose` convention; an element Polygraphy's element-wise check accepts, within
atol or within rtol, passes it too), with an optional part of atol that scales with the
largest |reference| of each image (`scaled_atol`). Masks are judged by the fraction of pixels that
differ; Dice per image is reported beside it, since on small masks a few flipped pixels
move Dice a lot without saying anything about the engine.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np


def logits_report(reference: np.ndarray, candidate: np.ndarray, *, atol: float, rtol: float,
                  scaled_atol: float = 0.0) -> Dict[str, Any]:
    """Element-wise tolerance check of two float batches (B, ...) of one shape.

    Returns:
      dict: max/mean absolute difference, `worst_ratio` (the largest |d| / (atol + rtol |ref|):
      <= 1 passes), the share of elements outside the tolerance, and "within".
    """
    if reference.shape != candidate.shape:
        return {"within": False, "shape": [list(reference.shape), list(candidate.shape)]}
    ref = reference.astype(np.float64)
    diff = np.abs(candidate.astype(np.float64) - ref)
    scale = np.abs(ref).reshape(len(ref), -1).max(1).reshape((-1,) + (1,) * (ref.ndim - 1)) if ref.size else 0.0
    bound = atol + scaled_atol * scale + rtol * np.abs(ref)
    finite = np.isfinite(diff)
    bad = ~(diff <= bound)  # NaN and inf count as outside
    ratio = diff[finite] / np.maximum(bound[finite], np.finfo(np.float64).tiny)
    return {
        "max_abs": float(diff[finite].max()) if finite.all() and diff.size else float("inf"),
        "mean_abs": float(diff[finite].mean()) if finite.any() else float("inf"),
        "worst_ratio": float(ratio.max()) if finite.all() and ratio.size else float("inf"),
        "non_finite": int((~finite).sum()),
        "outside": float(bad.mean()) if bad.size else 0.0,
        "atol": atol,
        "rtol": rtol,
        "scaled_atol": scaled_atol,
        "within": not bool(bad.any()),
    }


def dice_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice of two binary mask batches (B, ...) per image; two empty masks count as 1."""
    a = a.reshape(len(a), -1).astype(bool)
    b = b.reshape(len(b), -1).astype(bool)
    inter = (a & b).sum(1)
    total = a.sum(1) + b.sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def flipped_report(reference: np.ndarray, candidate: np.ndarray) -> Dict[str, float]:
    """How many mask (or label) pixels differ: over the whole batch and in the worst image."""
    differ = reference.reshape(len(reference), -1) != candidate.reshape(len(candidate), -1)
    return {"flipped": float(differ.mean()), "max_flipped_image": float(differ.mean(1).max()),
            "flipped_pixels": int(differ.sum())}


def dice_per_class(reference: np.ndarray, candidate: np.ndarray, num_labels: int) -> Dict[int, Any]:
    """Dice of each foreground label 1..num_labels-1 of two label-map batches, pooled over the batch.

    Returns:
      {label: Dice, or None where the label is absent from both}.
    """
    out: Dict[int, Any] = {}
    for c in range(1, num_labels):
        a, b = reference == c, candidate == c
        total = int(a.sum()) + int(b.sum())
        out[c] = None if total == 0 else float(2.0 * (a & b).sum() / total)
    return out
