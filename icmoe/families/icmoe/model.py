"""IC-MoE: three SAM experts, PPAV voting and fusion.

`ICMoE` is the deployable structure: the frozen ViT is stored once and shared
by the experts, since all three use the same pretrained weights (see
docs/icmoe.md, "The shared frozen backbone"). `NaiveICMoE` is the paper's
structure, three complete experts; it exists to check equivalence and to
measure what sharing saves. Both take RGB images in 0..255 (B, 3, H, W) and
normalise inside, exactly as the exported graphs do.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn

from icmoe.families.base import lookup_config
from icmoe.families.icmoe.config import CONFIGS, ICMoEConfig
from icmoe.families.icmoe.encoder import ExpertEncoder, SharedEncoder
from icmoe.families.icmoe.voting import Vote, ppav
from icmoe.sam.adapter import make_adapters
from icmoe.sam.build import build_image_encoder, build_mask_decoder, build_prompt_encoder
from icmoe.sam.checkpoint import load_sam_state_dict, split_sam_state_dict

EXPERT_NAMES = ("basic", "semantic", "adaptive")
Features = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class TrainOutput:
    logits: torch.Tensor  # (B, 1, H, W) fused logits z_final
    mask: torch.Tensor  # (B, 1, H, W) uint8
    expert: torch.Tensor  # (B,) int32 chosen candidate
    expert_logits: Features  # z0, z1, z2 each (B, 1, H, W)
    features: Features  # image-encoder outputs y0, y1, y2 each (B, C, h, w), for SgCL


class _ICMoEBase(nn.Module):
    """Pre-processing, prompt-free decoding and voting, common to both structures."""

    def __init__(self, *, config: ICMoEConfig, prompt_encoder: PromptEncoder, decoders: nn.ModuleList) -> None:
        super().__init__()
        if len(decoders) != 3:
            raise ValueError(f"IC-MoE needs 3 mask decoders, got {len(decoders)}")
        self.config = config
        self.alpha = config.alpha
        self.prompt_encoder = prompt_encoder.requires_grad_(False)
        self.decoders = decoders
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)
        # Inference voting function (same signature as `ppav`); `voting.op.install` swaps in the
        # fused-kernel op for eager GPU inference; training (a target) always uses ppav.
        self.voter = ppav

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Check (B, 3, S, S) float RGB 0..255 and apply SAM's normalisation."""
        s = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float RGB images in 0..255, got dtype {images.dtype}")
        return (images - self.pixel_mean) / self.pixel_std

    def decode(self, decoder: MaskDecoder, features: torch.Tensor) -> torch.Tensor:
        """Prompt-free decoding: features (B, C, h, w) -> logits (B, 1, S, S)."""
        b, c, h, w = features.shape
        # Empty sparse prompts with batch 1: SAM's decoder broadcasts its tokens
        # over the image batch, so B images decode in one call, each on its own.
        sparse = features.new_zeros((1, 0, c))
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(1, c, h, w)
        low, _ = decoder(
            image_embeddings=features,
            image_pe=self.prompt_encoder.get_dense_pe(),  # (1, C, h, w)
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )  # (B, 1, 4h, 4w)
        s = self.config.image_size
        return F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)  # (B, 1, S, S)

    def encode(self, x: torch.Tensor) -> Features:
        raise NotImplementedError

    def experts(self, images: torch.Tensor) -> Tuple[Features, Features]:
        """Per-expert logits (z0, z1, z2) and image features (y0, y1, y2)."""
        feats = self.encode(self.preprocess(images))  # 3 x (B, C, h, w)
        logits = tuple(self.decode(d, y) for d, y in zip(self.decoders, feats))  # 3 x (B, 1, S, S)
        return logits, feats  # type: ignore[return-value]

    def forward(
        self, images: torch.Tensor, target: Optional[torch.Tensor] = None, *, balance: Optional[bool] = None
    ) -> Union[Vote, TrainOutput]:
        """Run the experts, vote and fuse.

        Arguments:
          images: (B, 3, S, S) float RGB in 0..255.
          target: binary ground truth (B, 1, S, S) for training, or None.
          balance: load balancing; defaults to on in training (target given), off otherwise.

        Returns:
          Vote(logits, mask, expert) without a target; TrainOutput with one.
        """
        (z0, z1, z2), feats = self.experts(images)
        if balance is None:
            balance = target is not None
        voter = ppav if target is not None else self.voter
        vote = voter(z0, z1, z2, alpha=self.alpha, target=target, balance=balance)
        if target is None:
            return vote
        return TrainOutput(vote.logits, vote.mask, vote.expert, (z0, z1, z2), feats)


class ICMoE(_ICMoEBase):
    """IC-MoE with the frozen backbone stored once and its trunk run once."""

    def __init__(
        self, *, config: ICMoEConfig, encoder: SharedEncoder, prompt_encoder: PromptEncoder, decoders: nn.ModuleList
    ) -> None:
        super().__init__(config=config, prompt_encoder=prompt_encoder, decoders=decoders)
        self.encoder = encoder

    def encode(self, x: torch.Tensor) -> Features:
        return self.encoder(x)


class NaiveICMoE(_ICMoEBase):
    """Three complete experts, as the paper stores them (for equivalence and cost checks)."""

    def __init__(
        self, *, config: ICMoEConfig, encoders: nn.ModuleList, prompt_encoder: PromptEncoder, decoders: nn.ModuleList
    ) -> None:
        super().__init__(config=config, prompt_encoder=prompt_encoder, decoders=decoders)
        self.encoders = encoders

    def encode(self, x: torch.Tensor) -> Features:
        return tuple(enc(x) for enc in self.encoders)  # type: ignore[return-value]

    @classmethod
    def from_shared(cls, model: ICMoE) -> "NaiveICMoE":
        """Three independent experts holding copies of `model`'s weights."""
        enc = model.encoder
        basic = copy.deepcopy(enc.vit)
        semantic = copy.deepcopy(enc.vit)
        for i, blk in enumerate(enc.semantic_tail):
            semantic.blocks[enc.trunk_depth + i] = copy.deepcopy(blk)
        adaptive = copy.deepcopy(enc.vit)
        encoders = nn.ModuleList(
            [
                ExpertEncoder(vit=basic),
                ExpertEncoder(vit=semantic),
                ExpertEncoder(vit=adaptive, adapters=copy.deepcopy(enc.adapters)),
            ]
        )
        naive = cls(
            config=model.config,
            encoders=encoders,
            prompt_encoder=copy.deepcopy(model.prompt_encoder),
            decoders=copy.deepcopy(model.decoders),
        )
        return naive.train(model.training)


def build_icmoe(
    config: Union[str, ICMoEConfig] = "vit_b",
    *,
    sam_checkpoint: Optional[Union[str, os.PathLike]] = None,
    naive: bool = False,
) -> Union[ICMoE, NaiveICMoE]:
    """Build IC-MoE from a configuration, optionally from a SAM checkpoint.

    Arguments:
      config: a registry name (`vit_b`, `tiny`) or an `ICMoEConfig`.
      sam_checkpoint: SAM state-dict file in the official format (any input
        size; resized to the config's). None: random initialisation.
      naive: return the three-full-experts structure instead of the shared one.

    Returns:
      ICMoE (or NaiveICMoE), in eval mode, on the CPU.
    """
    cfg = lookup_config(CONFIGS, "icmoe", config) if isinstance(config, str) else config
    vit = build_image_encoder(cfg)
    prompt_encoder = build_prompt_encoder(cfg)
    decoder = build_mask_decoder(cfg)
    if sam_checkpoint is not None:
        parts = split_sam_state_dict(load_sam_state_dict(sam_checkpoint, cfg))
        vit.load_state_dict(parts["image_encoder"])
        prompt_encoder.load_state_dict(parts["prompt_encoder"])
        decoder.load_state_dict(parts["mask_decoder"])
    encoder = SharedEncoder(
        vit=vit,
        # The semantic expert starts from the pretrained trailing blocks and fine-tunes copies.
        semantic_tail=nn.ModuleList(copy.deepcopy(b) for b in vit.blocks[cfg.trunk_depth :]),
        adapters=make_adapters(cfg.depth, cfg.embed_dim, cfg.adapter_dim, cfg.adapter_mlp_scale),
    )
    encoder.semantic_tail.requires_grad_(True)
    # All three decoders start from the (pretrained) SAM decoder.
    decoders = nn.ModuleList(copy.deepcopy(decoder) for _ in range(3))
    model = ICMoE(config=cfg, encoder=encoder, prompt_encoder=prompt_encoder, decoders=decoders).eval()
    return NaiveICMoE.from_shared(model) if naive else model
