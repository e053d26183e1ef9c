"""icmoe.core.parity: element bounds, and discrete choices split into ties and clear flips by the
reference's own margin."""

from __future__ import annotations

import numpy as np
import pytest

from icmoe.core.parity import argmax_flips, choice_flips, error_bound, logits_report


def test_error_bound_scales_with_each_images_largest_logit():
    ref = np.array([[[1.0, -4.0]], [[0.5, 0.25]]], np.float32)  # (B=2, 1, 2)
    bound = error_bound(ref, atol=1e-3, rtol=0.01, scaled_atol=0.1)
    expected = np.array([[[1e-3 + 0.4 + 0.01, 1e-3 + 0.4 + 0.04]], [[1e-3 + 0.05 + 0.005, 1e-3 + 0.05 + 0.0025]]])
    np.testing.assert_allclose(bound, expected, rtol=1e-12, atol=0)
    # logits_report's gate is that bound: a difference just inside passes, just outside fails
    assert logits_report(ref, ref + 0.99 * bound, atol=1e-3, rtol=0.01, scaled_atol=0.1)["within"]
    assert not logits_report(ref, ref + 1.01 * bound, atol=1e-3, rtol=0.01, scaled_atol=0.1)["within"]


def test_choice_flips_split_by_margin_against_bound():
    reference = np.array([0, 1, 2, 1, 0])
    candidate = np.array([0, 2, 0, 0, 0])
    margin = np.array([9.0, 3.0, 5.0, 4.0, 9.0])  # where the choices agree the margin is not read
    bound = np.array([0.0, 3.0, 4.9, 10.0, 0.0])
    r = choice_flips(reference, candidate, margin, bound)
    assert (r["choice_flips"], r["tie_flips"], r["clear_flips"]) == (3, 2, 1)
    assert r["tie"].tolist() == [False, True, False, True, False]  # a margin equal to the bound is a tie


def test_argmax_flips_read_the_margin_between_the_reference_best_and_the_engine_choice():
    # one image, 3 classes (rows), 3 pixels (columns)
    logits = np.array([[[1.0, 3.0, 2.5], [0.9, 4.0, -5.0], [0.0, 0.0, 2.0]]], np.float32)  # (1, C=3, P=3)
    bound = np.full_like(logits, 0.1, dtype=np.float64)
    r = argmax_flips(logits, np.array([[[1, 1, 1]]], np.uint8), bound)  # the engine says class 1 everywhere
    # pixel 0: reference best 0 (1.0) vs 1 (0.9): margin 0.1 <= 0.2, a tie; pixel 1: it agrees (class 1 best);
    # pixel 2: best 0 (2.5) vs 1 (-5.0): margin 7.5, clear
    assert (r["choice_flips"], r["tie_flips"], r["clear_flips"]) == (2, 1, 1)
    assert r["tie"].tolist() == [[True, False, False]]


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (2, 1, 5)])
def test_argmax_flips_agree_where_labels_are_the_reference_argmax(shape):
    logits = np.random.default_rng(0).standard_normal(shape)
    r = argmax_flips(logits, logits.argmax(1)[:, None], np.zeros(shape))
    assert r["choice_flips"] == 0


def test_a_label_outside_the_classes_is_a_clear_flip():
    logits = np.zeros((1, 3, 2), np.float32)  # every class ties: any valid label would be a tie
    r = argmax_flips(logits, np.array([[[1, 255]]], np.uint8), np.ones_like(logits, dtype=np.float64))
    assert (r["choice_flips"], r["tie_flips"], r["clear_flips"]) == (2, 1, 1)
