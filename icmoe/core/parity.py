"""Parity measures of an engine's outputs against a reference: the pieces every family's gates use.

Logits are judged element by element, |candidate - reference| <= atol + rtol * |reference|
(NumPy's `isclose` convention; an element Polygraphy's element-wise check accepts, within
atol or within rtol, passes it too), with an optional part of atol that scales with the
largest |reference| of each image (`scaled_atol`). Masks are judged by the fraction of pixels that
differ; Dice per image is reported beside it, since on small masks a few flipped pixels
move Dice a lot without saying anything about the engine.

Discrete choices (a vote per image, a label per pixel, a routing decision) are judged by the
reference's own margin: a choice that differs where the reference's margin between its choice and the
engine's lies within the precision's error bound is a tie (`choice_flips`), and the engine's output
is then compared with the reference's output for the choice the engine made; a flip with a clear
margin is a defect. docs/export.md ("Parity gates").
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np


def error_bound(reference: np.ndarray, *, atol: float, rtol: float, scaled_atol: float = 0.0) -> np.ndarray:
    """The tolerance of each element of a float batch (B, ...):
    atol + scaled_atol * max|reference of its image| + rtol * |reference| (float64)."""
    ref = np.abs(reference.astype(np.float64))
    scale = ref.reshape(len(ref), -1).max(1).reshape((-1,) + (1,) * (ref.ndim - 1)) if ref.size else 0.0
    return atol + scaled_atol * scale + rtol * ref


def logits_report(reference: np.ndarray, candidate: np.ndarray, *, atol: float, rtol: float,
                  scaled_atol: float = 0.0) -> Dict[str, Any]:
    """Element-wise tolerance check of two float batches (B, ...) of one shape.

    Returns:
      dict: max/mean absolute difference, `worst_ratio` (the largest |d| / (atol + rtol |ref|):
      <= 1 passes), the share of elements outside the tolerance, and "within".
    """
    if reference.shape != candidate.shape:
        return {"within": False, "shape": [list(reference.shape), list(candidate.shape)]}
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    bound = error_bound(reference, atol=atol, rtol=rtol, scaled_atol=scaled_atol)
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


def choice_flips(reference: np.ndarray, candidate: np.ndarray, margin: np.ndarray, bound: np.ndarray) -> Dict[str, Any]:
    """Discrete choices of the candidate that differ from the reference's, split by the reference's margin.

    Arguments:
      reference, candidate: the choices, one per item (an image's vote, a pixel's label), of one shape.
      margin: per item, how far the reference's own figure of merit puts its choice ahead of the
        candidate's choice (>= 0; where they agree it is not read).
      bound: per item, how far the precision's error can move that margin, in the same units.

    Returns:
      dict: "choice_flips" (items that differ), "tie_flips" (of those, margin <= bound: the precision's
      error can move the reference across, so both choices are answers of the model), "clear_flips"
      (margin > bound: a defect), and "tie" (bool per item: a tie flip).
    """
    differ = np.asarray(reference) != np.asarray(candidate)
    tie = differ & (np.asarray(margin) <= np.asarray(bound))
    return {"choice_flips": int(differ.sum()), "tie_flips": int(tie.sum()), "clear_flips": int((differ & ~tie).sum()),
            "tie": tie}


def argmax_flips(logits: np.ndarray, candidate_labels: np.ndarray, bound: np.ndarray) -> Dict[str, Any]:
    """`choice_flips` of a per-pixel argmax over the class axis (1) of reference logits (B, C, ...).

    The margin of a pixel is its reference's best logit minus the reference's logit of the label the
    candidate chose; the bound the sum of the two logits' error bounds (`bound`, shaped like `logits`).
    `candidate_labels` is shaped (B, ...) or (B, 1, ...); a label outside 0..C-1 is a clear flip.
    """
    labels = candidate_labels.reshape((len(logits),) + logits.shape[2:]).astype(np.int64)
    valid = (labels >= 0) & (labels < logits.shape[1])
    ref_labels = logits.argmax(1)
    at = np.expand_dims(np.where(valid, labels, 0), 1)
    best = np.expand_dims(ref_labels, 1)
    margin = np.take_along_axis(logits, best, 1)[:, 0] - np.take_along_axis(logits, at, 1)[:, 0]
    allowed = np.take_along_axis(bound, best, 1)[:, 0] + np.take_along_axis(bound, at, 1)[:, 0]
    return choice_flips(ref_labels, labels, np.where(valid, margin, np.inf), allowed)


def parity_figures(ref_logits: np.ndarray, cand_logits: np.ndarray, ref_mask: np.ndarray, cand_mask: np.ndarray,
                   tolerances: Any) -> Dict[str, Any]:
    """The figures every family reports of logits and masks: `logits_report` under the tolerances
    (an object with atol, rtol, scaled_atol and to_dict(), e.g. `icmoe.families.Tolerances`) and
    `flipped_report`."""
    logits = logits_report(ref_logits, cand_logits, atol=tolerances.atol, rtol=tolerances.rtol,
                           scaled_atol=tolerances.scaled_atol)
    return {
        "images": int(len(ref_logits)),
        "max_abs_logit": logits.get("max_abs"),
        "mean_abs_logit": logits.get("mean_abs"),
        "logits_worst_ratio": logits.get("worst_ratio"),
        "logits_within_tol": logits["within"],
        **flipped_report(ref_mask, cand_mask),
        "tolerances": tolerances.to_dict(),
    }


def as_compared(reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Figures of the candidate against the reference as it is, before ties are taken into account
    (what a table of raw differences shows): max |dlogit| and flipped pixels."""
    diff = np.abs(candidate["logits"].astype(np.float64) - reference["logits"].astype(np.float64))
    return {"max_abs_logit": float(diff.max()) if diff.size else 0.0,
            "flipped": flipped_report(reference["mask"], candidate["mask"])["flipped"]}
