"""MoE-SAM: SAM ViT-B with adapters, a MoE feature-enhancing block, a self-prompting decoder.

Details: docs/moesam.md.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from torch import nn

from icmoe.core.errors import CheckpointError
from icmoe.families.base import lookup_config
from icmoe.families.moesam.config import CONFIGS, MoESAMConfig
from icmoe.families.moesam.feb import FeatureEnhancer
from icmoe.families.moesam.lpeg import PromptGenerator
from icmoe.sam.adapter import adapted_block_forward, make_adapters
from icmoe.sam.build import build_image_encoder, build_mask_decoder, build_prompt_encoder
from icmoe.sam.checkpoint import load_sam_state_dict, split_sam_state_dict

# Decoder parts that depend on C and start from random init (token 0 is background, not SAM's).
RANDOM_INIT = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
               "mask_decoder.iou_prediction_head.")


class MoESAM(nn.Module):
    """The model; see the module docstring. Frozen: the ViT (with its neck) and SAM's prompt encoder."""

    def __init__(self, *, config: MoESAMConfig, vit: ImageEncoderViT, adapters: nn.ModuleList,
                 feb: FeatureEnhancer, lpeg: PromptGenerator, prompt_encoder: PromptEncoder,
                 decoder: MaskDecoder) -> None:
        super().__init__()
        self.config = config
        self.vit = vit.requires_grad_(False)
        self.adapters = adapters
        self.feb = feb
        self.lpeg = lpeg
        self.prompt_encoder = prompt_encoder.requires_grad_(False)
        self.decoder = decoder

    def check(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float RGB images in 0..255, got dtype {images.dtype}")

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) 0..255 -> (SAM's neck output E0, stacked block outputs (B, L, h, w, D))."""
        t = self.vit.patch_embed(images / 255.0)  # (B, h, w, D): inputs in [0, 1], no mean/std
        if self.vit.pos_embed is not None:
            t = t + self.vit.pos_embed
        feats = []
        for blk, ad in zip(self.vit.blocks, self.adapters):
            t = adapted_block_forward(blk, ad, t)  # (B, h, w, D), after the block's second residual
            feats.append(t)
        e0 = self.vit.neck(t.permute(0, 3, 1, 2))  # (B, 256, h, w)
        return e0, torch.stack(feats, dim=1)  # (B, L, h, w, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) float RGB 0..255 -> logits (B, C+1, S, S), channel 0 = background."""
        self.check(images)
        return self.head(*self.encode(images))

    def head(self, e0: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """What follows `encode`: the FEB, the LPEG and the decoder -> logits (B, C+1, S, S)."""
        e = e0 + self.feb(feats)  # (B, 256, h, w)
        sparse = self.lpeg(e if self.config.lpeg_input == "enhanced" else e0)  # (B, 1, 256)
        low = self.decode(e, sparse)  # (B, C+1, 4h, 4w)
        s = self.config.image_size
        return F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)  # (B, C+1, S, S)

    def segment(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C+1, S, S) float32, label map (B, 1, S, S) uint8 = argmax, ties to the lowest class)."""
        logits = self(images)
        return logits, logits.argmax(dim=1, keepdim=True).to(torch.uint8)

    def decode(self, embedding: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """SAM's `MaskDecoder.predict_masks` with one prompt token per image and every mask token's map.

        SAM's own method repeats the image embedding once per prompt, for many prompts on one
        image; here image b has exactly its own prompt, so the batch stays B.

        Arguments:
          embedding: (B, 256, h, w) image embedding; sparse: (B, 1, 256) prompt tokens.

        Returns:
          (B, C+1, 4h, 4w) low-resolution logits.
        """
        dec = self.decoder
        b, c, h, w = embedding.shape
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)  # (1 + C+1, 256)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)  # (B, C+3, 256)
        src = embedding + self.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1)  # dense "no mask" prompt
        hs, src = dec.transformer(src, self.prompt_encoder.get_dense_pe(), tokens)  # (B, C+3, 256), (B, hw, 256)
        mask_tokens = hs[:, 1:1 + dec.num_mask_tokens]  # (B, C+1, 256)
        up = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, 32, 4h, 4w)
        hyper = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)],
                            dim=1)  # (B, C+1, 32)
        return (hyper @ up.flatten(2)).reshape(b, -1, up.shape[2], up.shape[3])  # (B, C+1, 4h, 4w)


def build_moesam(config: Union[str, MoESAMConfig] = "vit_b", *,
                 sam_checkpoint: Optional[Union[str, os.PathLike]] = None) -> MoESAM:
    """Build MoE-SAM, optionally from a SAM checkpoint.

    Arguments:
      config: a registry name (`vit_b`, `tiny`) or a `MoESAMConfig`.
      sam_checkpoint: SAM state-dict file in the official format (any input size; resized to
        the config's). The encoder, neck, prompt encoder and the decoder's transformer,
        upscaling and IoU token load from it; the C+1 mask tokens, their hypernetworks and the
        IoU head stay random. None: random initialisation.

    Returns:
      MoESAM in eval mode on the CPU; trainable: adapters, FEB, LPEG and the decoder.
    """
    cfg = lookup_config(CONFIGS, "moesam", config) if isinstance(config, str) else config
    vit, prompt_encoder, decoder = build_image_encoder(cfg), build_prompt_encoder(cfg), build_mask_decoder(cfg)
    if sam_checkpoint is not None:
        parts = split_sam_state_dict(load_sam_state_dict(sam_checkpoint, cfg, random_init=RANDOM_INIT))
        vit.load_state_dict(parts["image_encoder"])
        prompt_encoder.load_state_dict(parts["prompt_encoder"])
        missing, _ = decoder.load_state_dict(parts["mask_decoder"], strict=False)
        if any(not f"mask_decoder.{k}".startswith(RANDOM_INIT) for k in missing):
            raise CheckpointError(f"{sam_checkpoint}: mask decoder keys missing, e.g. {missing[0]}")
    feb = FeatureEnhancer(dim=cfg.embed_dim, out_chans=cfg.out_chans, num_experts=cfg.num_experts, k=cfg.k,
                          expert_hidden=cfg.expert_ratio * cfg.embed_dim, dropout=cfg.expert_dropout,
                          num_heads=cfg.feb_heads)
    model = MoESAM(config=cfg, vit=vit,
                   adapters=make_adapters(cfg.depth, cfg.embed_dim, cfg.adapter_dim, cfg.adapter_mlp_scale),
                   feb=feb, lpeg=PromptGenerator(channels=cfg.out_chans, hidden=cfg.lpeg_hidden),
                   prompt_encoder=prompt_encoder, decoder=decoder)
    return model.eval()
