"""PPAV voting as a PyTorch custom op, `torch.ops.icmoe.ppav`, for eager GPU inference.

Details: docs/icmoe.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from icmoe.families.icmoe.voting.reference import Vote
from icmoe.families.icmoe.voting.reference import ppav as reference_ppav

OP_NAME = "icmoe::ppav"


@torch.library.custom_op(OP_NAME, mutates_args=())
def ppav_op(
    z0: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    alpha: float = 0.5,
    balance: bool = False,
    threshold: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference voting: (logits float32, mask uint8, expert int32); CPU implementation (the reference)."""
    vote = reference_ppav(z0, z1, z2, alpha=alpha, balance=balance, threshold=threshold)
    # custom ops may not return views or aliases of their inputs
    return vote.logits.contiguous(), vote.mask.contiguous(), vote.expert.contiguous()


@ppav_op.register_kernel("cuda")
def _ppav_cuda(z0, z1, z2, alpha=0.5, balance=False, threshold=None):
    from icmoe.families.icmoe.voting.kernel import (
        ppav_triton,  # triton only when a CUDA tensor arrives
    )

    vote = ppav_triton(z0, z1, z2, alpha=alpha, balance=balance, threshold=threshold)
    return vote.logits, vote.mask, vote.expert


@ppav_op.register_fake
def _ppav_fake(z0, z1, z2, alpha=0.5, balance=False, threshold=None):
    torch._check(z0.dim() == 4 and z0.shape[1] == 1, lambda: f"expert logits must be (B, 1, H, W), got {z0.shape}")
    torch._check(z0.shape == z1.shape and z0.shape == z2.shape, lambda: "expert logits must share one shape")
    logits = torch.empty_like(z0, dtype=torch.float32, memory_format=torch.contiguous_format)
    mask = torch.empty_like(z0, dtype=torch.uint8, memory_format=torch.contiguous_format)
    expert = z0.new_empty((z0.shape[0],), dtype=torch.int32)
    return logits, mask, expert


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
    """Drop-in for `icmoe.families.icmoe.voting.ppav` that runs the fused kernel on CUDA at inference.

    Arguments and returns: as `icmoe.families.icmoe.voting.ppav`. With a `target`, or when
    autograd records the inputs, the reference is used (training path).
    """
    needs_grad = torch.is_grad_enabled() and any(z.requires_grad for z in (z0, z1, z2))
    if target is not None or needs_grad or z0.dtype != torch.float32:
        return reference_ppav(z0, z1, z2, alpha=alpha, target=target, balance=balance, threshold=threshold)
    logits, mask, expert = torch.ops.icmoe.ppav(z0, z1, z2, alpha, balance, threshold)
    return Vote(logits, mask, expert)


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model` (ICMoE / NaiveICMoE) vote with the custom op; returns the model.

    Raises:
      TypeError: the model has no `voter` hook.
    """
    if not hasattr(model, "voter"):
        raise TypeError(f"{type(model).__name__} has no `voter` hook to install the voting op on")
    model.voter = ppav
    return model
