"""The toy segmenters: SAM's ViT, prompt encoder and mask decoder, prompt-free."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from icmoe.sam.build import build_image_encoder, build_mask_decoder, build_prompt_encoder
from tests.icmoe.families.toy.config import ToyConfig


class ToySegmenter(nn.Module):
    """images (B, 3, S, S) RGB 0..255 -> logits (B, 1, S, S); `multimask`: SAM's three outputs (B, 3, S, S)."""

    multimask = False

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = build_image_encoder(config)
        self.prompt_encoder = build_prompt_encoder(config)
        self.decoder = build_mask_decoder(config)
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = self.vit((images - self.mean) / self.std)  # (B, C, h, w)
        c, h, w = y.shape[1:]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(1, c, h, w)
        low, _ = self.decoder(image_embeddings=y, image_pe=self.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=y.new_zeros((1, 0, c)), dense_prompt_embeddings=dense,
                              multimask_output=self.multimask)  # (B, K, 4h, 4w), K = 1 or 3
        s = self.config.image_size
        return F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)  # (B, K, S, S)


class ToyLabelsSegmenter(ToySegmenter):
    """images (B, 3, S, S) -> logits (B, 3, S, S), one channel per label."""

    multimask = True


class ToyOutputs(nn.Module):
    """images -> (logits, mask 0/1)."""

    def __init__(self, model: ToySegmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, (logits > 0).to(torch.uint8)


class ToyLabelsOutputs(ToyOutputs):
    """images -> (logits (B, 3, S, S), mask (B, 1, S, S) labels 0..2, the argmax)."""

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, logits.argmax(1, keepdim=True).to(torch.uint8)
