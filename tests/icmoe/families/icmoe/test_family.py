"""IC-MoE's parity judgement (icmoe/families/icmoe/family.py): the bound on how far a precision's error can
move a PPAV distance gap, and `compare` telling a vote that ties within it from one that flips clearly."""

from __future__ import annotations

import numpy as np
import pytest

from icmoe.families import get_family
from icmoe.families.icmoe.family import vote_gap_bound

PARITY = get_family("icmoe").parity


def _distances(cands: np.ndarray) -> np.ndarray:
    """PPAV's distances (voting/reference.py) of candidate logits (B, 3, 1, S, S): pixels off the majority."""
    masks = (cands > 0).reshape(len(cands), 3, -1)
    majority = masks.sum(1, keepdims=True) >= 2
    return (masks != majority).sum(-1)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_no_perturbation_within_the_bound_shrinks_a_gap_more_than_it_says(precision):
    gate = PARITY.tolerances(precision)
    rng = np.random.default_rng(0)
    cands = (rng.standard_normal((6, 3, 1, 8, 8)) * rng.choice([0.01, 1.0], (6, 3, 1, 8, 8))).astype(np.float32)
    cands[:, :, :, 0, 0] = 5.0  # each image's largest |logit|: what the scaled part of the bound scales with
    bound = vote_gap_bound(cands, gate)
    allowed = gate.atol + gate.scaled_atol * np.abs(cands).reshape(6, -1).max(1)[:, None, None, None, None] \
        + gate.rtol * np.abs(cands)
    before = _distances(cands)
    gap = before[:, None, :] - before[:, :, None]  # [b, r, c] = d_c - d_r
    worst = np.zeros_like(bound)
    for _ in range(300):
        moved = cands + rng.uniform(-1, 1, cands.shape) * allowed
        after = _distances(moved)
        worst = np.maximum(worst, gap - (after[:, None, :] - after[:, :, None]))
    assert (worst <= bound).all()
    assert (np.diagonal(bound, axis1=1, axis2=2) == 0).all() and bound.max() > 0


def test_the_bound_counts_one_pixel_per_candidate_that_may_change_sign():
    # one image, 2x2 pixels; candidate 0's logit at pixel (0, 0) is within the bound of zero, nothing else is
    cands = np.full((1, 3, 1, 2, 2), 4.0, np.float32)
    cands[0, 1] = -4.0
    cands[0, 0, 0, 0, 0] = 1e-6
    bound = vote_gap_bound(cands, PARITY.tolerances("fp32"))
    # pixel (0, 0): masks 1, 0, 1, majority 1, distances +0, +1, +0; with candidate 0 turned 0: majority 0,
    # +0, +0, +1. So d_1 - d_0 may shrink by 1, d_0 - d_2 by 1, d_1 - d_2 by 2 ([r, c] bounds d_c - d_r).
    assert bound[0].tolist() == [[0, 1, 0], [0, 0, 0], [1, 2, 0]]


def _reference(margin_gap: float, bound: float):
    """Two images of 4x4; the reference chose candidate 0 on both; candidate 1's distance is `margin_gap`
    worse, and the gate's bound on that gap is `bound`."""
    rng = np.random.default_rng(1)
    choice_logits = rng.standard_normal((2, 3, 1, 4, 4)).astype(np.float32)
    logits = choice_logits[:, 0].copy()
    ref = {"logits": logits, "mask": (logits > 0).astype(np.uint8), "expert": np.zeros(2, np.int32),
           "choice_logits": choice_logits, "choice_distance": np.array([[3.0, 3.0 + margin_gap, 9.0]] * 2),
           "choice_bound": np.full((2, 3, 3), bound)}
    return ref, choice_logits


@pytest.mark.parametrize("margin, bound, passes", [(2.0, 2.0, True), (2.0, 6.0, True), (3.0, 2.0, False)])
def test_a_flipped_vote_passes_as_a_tie_only_within_the_bound(margin, bound, passes):
    """The engine took candidate 1 on image 1 and computed eager's output for that choice exactly: a tie
    (margin <= bound) passes, judged against that output; a clear flip fails though its output is exact."""
    ref, choice_logits = _reference(margin, bound)
    logits = ref["logits"].copy()
    logits[1] = choice_logits[1, 1]
    cand = {"logits": logits, "mask": (logits > 0).astype(np.uint8), "expert": np.array([0, 1], np.int32)}
    r = PARITY.compare(ref, cand, PARITY.tolerances("fp16"))
    assert r["passed"] is passes, r
    assert (r["choice_flips"], r["tie_flips"], r["clear_flips"]) == (1, int(passes), int(not passes))
    assert r["agreement"] == 0.5
    if passes:
        assert r["max_abs_logit"] == 0 and r["flipped"] == 0  # judged against eager's output for its choice
    assert r["as_compared"]["max_abs_logit"] > 0  # and the table still shows the raw difference


def test_a_tie_whose_output_is_not_eagers_for_that_choice_fails():
    ref, choice_logits = _reference(1.0, 5.0)
    logits = ref["logits"].copy()
    logits[1] = choice_logits[1, 1] + 0.5  # the chosen candidate, computed wrongly
    cand = {"logits": logits, "mask": (logits > 0).astype(np.uint8), "expert": np.array([0, 1], np.int32)}
    r = PARITY.compare(ref, cand, PARITY.tolerances("fp16"))
    assert not r["passed"] and r["tie_flips"] == 1 and not r["logits_within_tol"]


def test_without_the_per_choice_reference_every_flip_is_clear():
    ref, choice_logits = _reference(0.0, 100.0)
    plain = {k: ref[k] for k in ("logits", "mask", "expert")}
    cand = {"logits": ref["logits"], "mask": ref["mask"], "expert": np.array([0, 1], np.int32)}
    r = PARITY.compare(plain, cand, PARITY.tolerances("fp16"))
    assert not r["passed"] and r["clear_flips"] == 1
