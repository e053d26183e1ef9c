"""Losses: CE, soft Dice, and SgCL's behaviour under its own gradient."""

from __future__ import annotations

import torch

from icmoe.families.icmoe.losses import SgCL, bce_loss, dice_loss, total_loss


def test_dice_and_ce_are_small_for_confident_correct_logits():
    target = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    good = (target * 2 - 1) * 20
    bad = -good
    assert dice_loss(good, target) < 1e-3 < 0.9 < dice_loss(bad, target)
    assert bce_loss(good, target) < 1e-6 and bce_loss(bad, target) > 10


def test_total_loss_weights_the_parts():
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    parts = total_loss(logits, target, torch.tensor(2.0))
    torch.testing.assert_close(parts["loss"], parts["ce"] + parts["dice"] + 0.1 * 2.0)


def _features(seed: int, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 16, 4, 4, generator=g) + shift for _ in range(3)]


def test_sgcl_gradient_moves_foreground_and_background_features_apart():
    torch.manual_seed(0)
    sgcl = SgCL(channels=16)
    y = [f.requires_grad_() for f in _features(0)]
    fg, bg = _features(1), _features(2, shift=0.1)  # fg/bg passes carry no gradient
    opt = torch.optim.SGD(list(sgcl.parameters()) + y, lr=0.5)
    first = sgcl.terms(y, fg, bg)
    for _ in range(20):
        opt.zero_grad()
        terms = sgcl.terms(y, fg, bg)
        terms.loss.backward()
        opt.step()
    last = sgcl.terms(y, fg, bg)
    assert last.l1 > first.l1 * 1.05, (first.l1.item(), last.l1.item())  # separation grows
    assert last.loss < first.loss


def test_sgcl_terms_follow_their_definitions():
    sgcl = SgCL(channels=16)
    y, fg, bg = _features(0), _features(1), _features(2)
    t = sgcl.terms(y, fg, bg)
    norm = lambda w, v: torch.nn.functional.normalize(w(v), dim=1)  # noqa: E731
    y3 = torch.stack(y).mean(0)
    l2 = torch.stack([(norm(sgcl.w2, v) - norm(sgcl.w2, y[0])).abs().mean() for v in (y[1], y[2], y3)]).mean()
    l3 = torch.stack([(norm(sgcl.w3, v) - norm(sgcl.w3, y[2])).abs().mean() for v in (y[1], y3)]).mean()
    torch.testing.assert_close(t.l2, l2)
    torch.testing.assert_close(t.l3, l3)
    torch.testing.assert_close(t.loss, t.l2 / (t.l1 + t.l3 + sgcl.eps))
