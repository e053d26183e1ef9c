"""Checks shared by the tests of multi-class (label) masks: a label map against the eager reference.

A label is the argmax over the logits channels, so where the eager model's two largest logits are
within float rounding of each other another engine may pick the other label. Such pixels may differ;
every other pixel must be equal.
"""

from __future__ import annotations

import numpy as np


def top2_gap(logits: np.ndarray) -> np.ndarray:
    """(B, K, H, W) logits -> (B, 1, H, W): the largest minus the second largest value (K >= 2)."""
    top = np.sort(logits, axis=1)
    return top[:, -1:] - top[:, -2:-1]


def check_label_mask(mask: np.ndarray, ref_mask: np.ndarray, ref_logits: np.ndarray, tol: float) -> int:
    """Assert that `mask` equals `ref_mask` except where the eager top-2 logit gap is <= `tol`.

    Arguments:
      mask, ref_mask: (B, 1, H, W) uint8 label maps (candidate and eager).
      ref_logits: (B, K, H, W) eager logits.
      tol: the logits tolerance of the comparison.

    Returns:
      int: how many pixels differ (all of them near-ties).
    """
    assert mask.shape == ref_mask.shape and mask.dtype == np.uint8, (mask.shape, mask.dtype)
    differ = mask != ref_mask
    real = differ & (top2_gap(ref_logits) > tol)
    assert not real.any(), f"{int(real.sum())} label pixels differ where the eager logits are not tied"
    return int(differ.sum())
