"""Medical-SAM-Adapter style adapters and the adapted forward of a frozen SAM block.

An adapted block reuses the frozen block's modules (norms, attention, MLP) and owns
two bottleneck adapters (docs/sam.md, "Adapters"): one with a skip connection right
after attention, one in parallel with the MLP scaled by `mlp_scale`.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from torch import nn


class Adapter(nn.Module):
    """Bottleneck Linear(dim -> hidden) - GELU - Linear(hidden -> dim), optional skip."""

    def __init__(self, *, dim: int, hidden: int, skip: bool) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act(self.down(x)))
        return x + y if self.skip else y


class BlockAdapters(nn.Module):
    """The two adapters of one ViT block."""

    def __init__(self, *, dim: int, hidden: int, mlp_scale: float) -> None:
        super().__init__()
        self.space = Adapter(dim=dim, hidden=hidden, skip=True)  # after attention
        self.mlp = Adapter(dim=dim, hidden=hidden, skip=False)  # parallel to the MLP
        self.mlp_scale = mlp_scale


def adapted_block_forward(block: Block, adapters: BlockAdapters, x: torch.Tensor) -> torch.Tensor:
    """SAM's `Block.forward` with the adapters inserted; `block` may be frozen and shared.

    Arguments:
      block: a segment-anything ViT block (its weights are used, not copied).
      adapters: this block's adapters.
      x: tokens (B, h, w, D).

    Returns:
      tokens (B, h, w, D).
    """
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        H, W = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, block.window_size)  # (B * nW, ws, ws, D)
    x = block.attn(x)
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, pad_hw, (H, W))  # (B, h, w, D)
    x = adapters.space(x)
    x = shortcut + x
    xn = block.norm2(x)
    return x + block.mlp(xn) + adapters.mlp_scale * adapters.mlp(xn)


def make_adapters(depth: int, dim: int, hidden: int, mlp_scale: float) -> nn.ModuleList:
    """One `BlockAdapters` per ViT block."""
    return nn.ModuleList(BlockAdapters(dim=dim, hidden=hidden, mlp_scale=mlp_scale) for _ in range(depth))
