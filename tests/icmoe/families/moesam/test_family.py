"""MoE-SAM's parity judgement (icmoe/families/moesam/family.py): the FEB's routing is a top-k per expert and
the labels an argmax, both discrete choices. An engine whose error crosses a routing tie (an expert's k-th
and (k+1)-th router logits within the gate's bound) is judged against eager's output for the other
routing; a label that differs within the reference's margin is a tie; anything else fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.eager import EagerEngine
from export.verify import eager_choices, run_batched
from icmoe.families import Tolerances, get_family
from icmoe.families.moesam.family import swapped_ties

FAMILY = get_family("moesam")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_tied_routing_decision_takes_the_next_token():
    torch.manual_seed(0)
    moe = FAMILY.build(FAMILY.get_config("tiny")).feb.moe.eval()
    x = torch.randn(2, 64, moe.gate.in_features)
    moe.k = 16
    weights, index = moe.route(x)
    every = Tolerances(atol=1e9, rtol=0.0, max_flipped=0.0)  # every decision a tie
    model = torch.nn.Sequential(moe)
    for gate, changed in ((every, 1), (Tolerances(atol=0.0, rtol=0.0, max_flipped=0.0), 0)):
        ties = []
        with swapped_ties(model, gate, ties):
            w2, i2 = moe.route(x)
        assert ties[0].tolist() == [changed * moe.gate.out_features] * 2
        for b in range(2):
            for e in range(moe.gate.out_features):
                assert len(set(index[b, e].tolist()) - set(i2[b, e].tolist())) == changed
        assert torch.allclose(w2.sum(-1), torch.ones(2, moe.gate.out_features))
    assert "route" not in vars(moe), "the model's own routing is back after the context"


@pytest.fixture(scope="module")
def routed():
    """A random-init tiny MoE-SAM whose experts' outputs are scaled up (x1e5) so that taking one token
    instead of another moves the logits beyond FP16's bound (5x it); eager's outputs on 4 images, and under
    the FP16 gate eager's outputs for the tied routing decisions taken the other way."""
    torch.manual_seed(0)
    model = FAMILY.build(FAMILY.get_config("tiny"))
    with torch.no_grad():
        for expert in model.feb.moe.experts:
            expert.fc2.weight.mul_(1e5)
            expert.fc2.bias.mul_(1e5)
    images = FAMILY.parity.synthetic_inputs(4, model.config.image_size, seed=0)
    gate = FAMILY.parity.tolerances("fp16")
    with EagerEngine(model=model) as eager:
        reference = run_batched(eager, images, 4)
        choices = eager_choices(FAMILY, eager, images, 4, [gate])[gate]
    return reference, choices, gate


def _engine(logits):
    return {"logits": logits, "mask": logits.argmax(1)[:, None].astype(np.uint8)}


def test_an_engine_that_routes_a_tie_the_other_way_passes(routed):
    reference, choices, gate = routed
    other = choices["swapped_logits"]
    assert (choices["routing_ties"] > 0).all()
    apart = FAMILY.parity.compare(reference, _engine(other), gate)  # without eager's other routing
    assert not apart["passed"] and not apart["logits_within_tol"], "the test model's routing does not matter"
    r = FAMILY.parity.compare({**reference, **choices}, _engine(other), gate)
    assert r["passed"] and r["routing_swapped"] == 4 and r["routing_tie_images"] == 4, r
    assert r["max_abs_logit"] == 0 and r["as_compared"]["max_abs_logit"] > 0


def test_a_wrong_output_next_to_a_routing_tie_fails(routed):
    reference, choices, gate = routed
    wrong = choices["swapped_logits"].copy()
    wrong[2, 1] += 0.05 * np.abs(wrong[2]).max()  # one class map of one image off by 5% of its scale
    r = FAMILY.parity.compare({**reference, **choices}, _engine(wrong), gate)
    assert not r["passed"] and not r["logits_within_tol"], r


def test_labels_that_differ_within_the_margin_are_ties_and_clear_ones_fail(routed):
    reference, choices, gate = routed
    logits = reference["logits"]
    top2 = np.sort(logits, axis=1)
    margin = top2[:, -1] - top2[:, -2]  # (B, S, S)
    second = np.argsort(logits, axis=1)[:, -2]
    near, far = np.unravel_index(margin.argmin(), margin.shape), np.unravel_index(margin.argmax(), margin.shape)
    for pixel, is_tie in ((near, True), (far, False)):
        cand = {"logits": logits, "mask": reference["mask"].copy()}
        cand["mask"][pixel[0], 0, pixel[1], pixel[2]] = second[pixel]  # the engine's label: the reference's runner-up
        r = FAMILY.parity.compare({**reference, **choices}, cand, gate)
        assert (r["choice_flips"], r["tie_flips"], r["clear_flips"]) == (1, int(is_tie), int(not is_tie)), r
        assert r["passed"] is is_tie
