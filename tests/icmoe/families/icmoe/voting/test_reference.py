"""PPAV voting and fusion (docs/icmoe.md, "Fusion and voting"), on hand-built logit maps."""

from __future__ import annotations

import pytest
import torch

from icmoe.families.icmoe.voting import candidate_distances, choose_candidates, ppav


def _maps(*masks):
    """Logit maps from 0/1 masks: +1 where 1, -1 where 0; each (1, 1, H, W)."""
    return [torch.tensor(m, dtype=torch.float32).view(1, 1, *torch.tensor(m).shape) * 2 - 1 for m in masks]


def test_majority_target_at_inference():
    # z0, z1 agree on the left column, z2 is strongly positive everywhere.
    z0 = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]])
    z1 = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]]])
    z2 = torch.tensor([[[[3.0, 3.0], [3.0, 3.0]]]])
    # z3 = (z0+z1+z2)/3 = [[5/3, 1/3], [5/3, 1]] -> all positive
    # masks: M0=[[1,0],[1,0]] M1=[[1,0],[1,1]] M3=[[1,1],[1,1]]; majority = [[1,0],[1,1]] = M1
    d = candidate_distances(z0, z1, z2)
    assert d.tolist() == [[1.0, 0.0, 1.0]]
    vote = ppav(z0, z1, z2)
    assert vote.expert.tolist() == [1]


def test_smallest_distance_wins_with_ground_truth_target():
    z0, z1, z2 = _maps([[1, 1, 0, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]])
    gt = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    # z3 = (z0+z1+z2)/3 = [1/3, -1/3, -1, -1] -> M3 = [1,0,0,0] (ties z1 at distance 0)
    d = candidate_distances(z0, z1, z2, gt)
    assert d.tolist() == [[1.0, 0.0, 0.0]]
    vote = ppav(z0, z1, z2, target=gt)
    assert vote.expert.tolist() == [1]  # tie between positions 1 and 2 goes to 1
    expected = z2 + 0.5 * z1
    torch.testing.assert_close(vote.logits, expected, rtol=0, atol=0)
    assert torch.equal(vote.mask, (expected > 0).to(torch.uint8))


def test_ties_go_to_lowest_position():
    z = torch.ones(1, 1, 4, 4)
    vote = ppav(z, z, z)  # every candidate identical: all distances 0
    assert vote.expert.tolist() == [0]
    assert choose_candidates(torch.tensor([[2.0, 1.0, 1.0], [3.0, 3.0, 3.0], [5.0, 4.0, 4.5]])).tolist() == [1, 0, 1]


def test_alpha_scales_the_chosen_candidate():
    z0, z1, z2 = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -2.0), torch.full((1, 1, 2, 2), -0.5)
    # M0 = 1, M1 = 0, M3 = (2-2-0.5)/3 < 0 -> 0; majority 0 -> z1 (position 1) wins over z3 (position 2).
    for alpha in (0.0, 0.5, 2.0):
        vote = ppav(z0, z1, z2, alpha=alpha)
        assert vote.expert.tolist() == [1]
        torch.testing.assert_close(vote.logits, z2 + alpha * z1, rtol=0, atol=0)


def test_balancing_drops_overused_candidate():
    # 6 samples all prefer candidate 0 (then 1, then 2); threshold ceil(6/3) = 2:
    # a candidate already chosen MORE than 2 times is dropped, so 0 is taken 3 times, then 1.
    d = torch.tensor([[0.0, 1.0, 2.0]] * 6)
    assert choose_candidates(d, balance=True).tolist() == [0, 0, 0, 1, 1, 1]
    assert choose_candidates(d, balance=True, threshold=0).tolist() == [0, 1, 2, 0, 1, 2]
    assert choose_candidates(d, balance=False).tolist() == [0] * 6


def test_balancing_takes_next_best_by_distance_then_position():
    d = torch.tensor([[0.0, 5.0, 3.0], [0.0, 5.0, 3.0], [0.0, 4.0, 4.0]])
    # threshold 0: each candidate at most once. Sample 1 falls to its next best (2), sample 2 to
    # its next best among ties 1 and 2 -> position 1 (2 is used anyway).
    assert choose_candidates(d, balance=True, threshold=0).tolist() == [0, 2, 1]


def test_balancing_in_ppav_uses_the_batch():
    z = torch.ones(4, 1, 3, 3)
    unbalanced = ppav(z, z, z).expert.tolist()
    balanced = ppav(z, z, z, balance=True, threshold=1).expert.tolist()
    assert unbalanced == [0, 0, 0, 0]
    assert balanced == [0, 0, 1, 1]


def test_inference_choice_of_a_sample_ignores_its_batch():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(8, 1, 16, 16, generator=g) for _ in range(3)]
    full = ppav(*z)
    for i in range(8):
        alone = ppav(*(t[i : i + 1] for t in z))
        assert alone.expert.item() == full.expert[i].item()
        torch.testing.assert_close(alone.logits, full.logits[i : i + 1], rtol=0, atol=0)
    # Replacing the other samples does not change sample 3.
    z2 = [torch.cat([torch.randn(3, 1, 16, 16, generator=g), t[3:4], torch.randn(4, 1, 16, 16, generator=g)]) for t in z]
    mixed = ppav(*z2)
    assert mixed.expert[3].item() == full.expert[3].item()
    torch.testing.assert_close(mixed.logits[3], full.logits[3], rtol=0, atol=0)


def test_gradient_flows_to_main_and_chosen_expert_only():
    z0, z1, z2 = (torch.randn(1, 1, 4, 4, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        z0.fill_(5.0)  # z0 certainly positive; z1 strongly negative -> majority follows z0/z3
        z1.fill_(-5.0)
        z2.fill_(1.0)
    vote = ppav(z0, z1, z2, alpha=0.5)
    vote.logits.sum().backward()
    assert vote.expert.item() == 0
    assert torch.all(z2.grad == 1.0) and torch.all(z0.grad == 0.5) and torch.all(z1.grad == 0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share one"):
        ppav(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4, 4))
