"""Pixel-probability adaptive voting (PPAV) and fusion: the PyTorch reference.

Details: docs/icmoe.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

NUM_CANDIDATES = 3  # z0 (basic), z1 (semantic), z3 (fused)


class Vote(NamedTuple):
    logits: torch.Tensor  # (B, 1, H, W) float: z_final
    mask: torch.Tensor  # (B, 1, H, W) uint8: z_final > 0
    expert: torch.Tensor  # (B,) int32: chosen candidate (0 basic, 1 semantic, 2 fused)


def candidate_distances(
    z0: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, target: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """L1 distance of each candidate mask to the target, (B, 3) float32.

    Arguments:
      z0, z1, z2: expert logits (B, 1, H, W).
      target: binary ground truth (B, 1, H, W), or None for the inference
        pseudo ground truth (majority of the candidate masks).
    """
    z3 = (z0 + z1 + z2) / 3
    masks = torch.stack([z0 > 0, z1 > 0, z3 > 0], dim=1).float()  # (B, 3, 1, H, W)
    if target is None:
        target = (masks.sum(dim=1) >= 2).float()  # (B, 1, H, W) majority
    else:
        target = (target > 0.5).float()
    return (masks - target.unsqueeze(1)).abs().flatten(2).sum(-1)  # (B, 3)


def choose_candidates(distances: torch.Tensor, *, balance: bool = False, threshold: Optional[int] = None) -> torch.Tensor:
    """Pick a candidate per sample from (B, 3) distances; returns (B,) int64.

    Without balancing: argmin, ties to the lowest position (a sample's choice
    depends on that sample alone). With balancing: samples are taken in batch
    order; a candidate already chosen more than `threshold` times in the batch
    is dropped for the sample and the next best (stable order) is taken.
    `threshold` defaults to ceil(B / 3), with which some candidate is always
    available; with a smaller custom threshold, once every candidate is over
    it the least-used one (best first among equals) is taken.
    """
    if not balance:
        return torch.argmin(distances, dim=1)  # first minimum on ties
    b = distances.shape[0]
    thr = math.ceil(b / NUM_CANDIDATES) if threshold is None else threshold
    order = torch.argsort(distances, dim=1, stable=True).tolist()  # best first, ties by position
    counts = [0] * NUM_CANDIDATES
    chosen = []
    for ranks in order:
        pick = next((c for c in ranks if counts[c] <= thr), None)
        if pick is None:
            pick = min(ranks, key=lambda c: counts[c])  # min keeps rank order among equal counts
        counts[pick] += 1
        chosen.append(pick)
    return torch.tensor(chosen, dtype=torch.int64, device=distances.device)


def ppav(
    z0: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    alpha: float = 0.5,
    target: Optional[torch.Tensor] = None,
    balance: bool = False,
    threshold: Optional[int] = None,
) -> Vote:
    """Vote among the candidates and fuse with the main (adaptive) expert.

    Arguments:
      z0, z1, z2: logits of the basic, semantic and adaptive experts, (B, 1, H, W).
      alpha: fusion weight.
      target: ground truth (B, 1, H, W) in training; None at inference.
      balance: apply load balancing within the batch (training default; off at inference).
      threshold: balancing threshold, default ceil(B / 3).

    Returns:
      Vote(logits (B,1,H,W) float, mask (B,1,H,W) uint8, expert (B,) int32).
    """
    if not (z0.shape == z1.shape == z2.shape) or z0.dim() != 4 or z0.shape[1] != 1:
        raise ValueError(
            f"expert logits must share one (B, 1, H, W) shape, got {tuple(z0.shape)}, "
            f"{tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    z3 = (z0 + z1 + z2) / 3
    with torch.no_grad():
        idx = choose_candidates(candidate_distances(z0, z1, z2, target), balance=balance, threshold=threshold)
    cands = torch.stack([z0, z1, z3], dim=1)  # (B, 3, 1, H, W)
    gather_idx = idx.view(-1, 1, 1, 1, 1).expand(-1, 1, *cands.shape[2:])  # (B, 1, 1, H, W)
    chosen = torch.gather(cands, 1, gather_idx).squeeze(1)  # (B, 1, H, W)
    logits = z2 + alpha * chosen
    return Vote(logits, (logits > 0).to(torch.uint8), idx.to(torch.int32))
