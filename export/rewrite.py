"""Export-time rewrites: the same function as the PyTorch model, with less work in the graph.

Details: docs/export.md.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    add_decomposed_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn

PADDING_FREE_WINDOWS = "padding_free_windows"
# names of the rewrites `export_onnx(rewrite=True)` applies, recorded in the build manifest
REWRITES = (PADDING_FREE_WINDOWS,)


class PaddingFreeWindowAttention(nn.Module):
    """SAM's windowed attention on a (B, h, w, D) grid, with the projections on real tokens only.

    Arguments (keyword-only):
      attn: the block's `Attention` (its modules are used, not copied).
      window_size: the block's window side.
    """

    def __init__(self, *, attn: Attention, window_size: int) -> None:
        super().__init__()
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:  # the same Parameter objects: shared, not copied
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, D = x.shape
        ws, nh = self.window_size, self.num_heads
        qkv = nn.functional.linear(x, self.qkv.weight)  # (B, h, w, 3D), real tokens only
        qkv, pad_hw = window_partition(qkv, ws)  # (B*nW, ws, ws, 3D), padding is 0 ...
        if self.qkv.bias is not None:
            qkv = qkv + self.qkv.bias  # ... and becomes qkv(0) = bias, as in SAM
        n = qkv.shape[0]
        qkv = qkv.reshape(n, ws * ws, 3, nh, -1).permute(2, 0, 3, 1, 4)  # (3, B*nW, nh, ws*ws, hd)
        q, k, v = qkv.reshape(3, n * nh, ws * ws, -1).unbind(0)  # (B*nW*nh, ws*ws, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW*nh, ws*ws, ws*ws)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (ws, ws), (ws, ws))
        attn = attn.softmax(dim=-1)
        y = (attn @ v).view(n, nh, ws, ws, -1).permute(0, 2, 3, 1, 4).reshape(n, ws, ws, -1)  # (B*nW, ws, ws, D)
        y = window_unpartition(y, ws, pad_hw, (H, W))  # (B, h, w, D), padded queries dropped
        return self.proj(y)  # (B, h, w, D)


class PaddingFreeWindowBlock(nn.Module):
    """A windowed SAM `Block` whose attention partitions internally (see the module docstring).

    It reports `window_size = 0`, so code that runs SAM blocks (`Block.forward` semantics,
    `icmoe.adapter.adapted_block_forward`) hands it the whole grid.
    """

    def __init__(self, *, block: Block) -> None:
        super().__init__()
        if block.window_size <= 0:
            raise ValueError("PaddingFreeWindowBlock needs a windowed block")
        self.norm1 = block.norm1
        self.attn = PaddingFreeWindowAttention(attn=block.attn, window_size=block.window_size)
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.window_size = 0  # partitioning happens inside self.attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, h, w, D)
        return x + self.mlp(self.norm2(x))


@contextlib.contextmanager
def padding_free_windows(model: nn.Module) -> Iterator[int]:
    """Within the block, every windowed SAM block of `model` is a `PaddingFreeWindowBlock`.

    Arguments:
      model: any module holding SAM ViT blocks in `nn.ModuleList`s (`ICMoE`, `NaiveICMoE`).

    Yields:
      int: how many blocks were swapped.
    """
    swapped: List[Tuple[nn.ModuleList, int, Block]] = []
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for i, blk in enumerate(module):
                if isinstance(blk, Block) and blk.window_size > 0:
                    swapped.append((module, i, blk))
    try:
        for parent, i, blk in swapped:
            parent[i] = PaddingFreeWindowBlock(block=blk)
        yield len(swapped)
    finally:
        for parent, i, blk in swapped:
            parent[i] = blk
