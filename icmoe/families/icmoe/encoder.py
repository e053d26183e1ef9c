"""Image encoders of the three experts: the shared frozen backbone and the naive copies.

`SharedEncoder` holds the frozen SAM ViT once (docs/icmoe.md, "The shared
frozen backbone"): the basic expert uses it unchanged, the semantic expert
replaces only its trailing blocks, the adaptive expert adds adapters. The
basic and semantic experts run patch embedding and blocks 0..N-3 once; only
the last `semantic_blocks` blocks run twice (frozen, and the semantic
expert's trainable copies). The adaptive expert runs every frozen block with
its adapters, since they change every block's output.

`ExpertEncoder` is one expert's full encoder, as the paper stores it; three of
them make the naive structure used to check equivalence and cost.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from icmoe.sam.adapter import adapted_block_forward


def _embed(vit: ImageEncoderViT, x: torch.Tensor) -> torch.Tensor:
    t = vit.patch_embed(x)  # (B, h, w, D)
    if vit.pos_embed is not None:
        t = t + vit.pos_embed
    return t


def _run(blocks: Sequence[nn.Module], t: torch.Tensor) -> torch.Tensor:
    for blk in blocks:
        t = blk(t)
    return t


def _neck(vit: ImageEncoderViT, t: torch.Tensor) -> torch.Tensor:
    return vit.neck(t.permute(0, 3, 1, 2))  # (B, C, h, w)


class SharedEncoder(nn.Module):
    """Frozen ViT held once, the semantic expert's trailing blocks, the adaptive expert's adapters."""

    def __init__(
        self,
        *,
        vit: ImageEncoderViT,
        semantic_tail: nn.ModuleList,
        adapters: nn.ModuleList,
    ) -> None:
        super().__init__()
        if len(adapters) != len(vit.blocks):
            raise ValueError(f"{len(adapters)} adapter pairs for {len(vit.blocks)} blocks")
        self.vit = vit
        self.semantic_tail = semantic_tail
        self.adapters = adapters
        self.trunk_depth = len(vit.blocks) - len(semantic_tail)
        self.vit.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, H, W) -> features of the basic, semantic, adaptive experts,
        each (B, C, h, w)."""
        k = self.trunk_depth
        t = _embed(self.vit, x)  # (B, h, w, D)
        trunk = _run(self.vit.blocks[:k], t)  # shared by basic and semantic: run once
        y0 = _run(self.vit.blocks[k:], trunk)  # frozen tail
        y1 = _run(self.semantic_tail, trunk)  # fine-tuned tail
        y2 = t
        for blk, ad in zip(self.vit.blocks, self.adapters):  # adapters change every block
            y2 = adapted_block_forward(blk, ad, y2)
        return _neck(self.vit, y0), _neck(self.vit, y1), _neck(self.vit, y2)


class ExpertEncoder(nn.Module):
    """One expert's complete encoder: its own ViT copy, with adapters for the adaptive expert."""

    def __init__(self, *, vit: ImageEncoderViT, adapters: Optional[nn.ModuleList] = None) -> None:
        super().__init__()
        self.vit = vit
        self.adapters = adapters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = _embed(self.vit, x)  # (B, h, w, D)
        if self.adapters is None:
            t = _run(self.vit.blocks, t)
        else:
            for blk, ad in zip(self.vit.blocks, self.adapters):
                t = adapted_block_forward(blk, ad, t)
        return _neck(self.vit, t)  # (B, C, h, w)
