"""SAM's parts built from a family's configuration (`icmoe.sam.config.SamConfig`) at any input size.

The modules are segment-anything's (`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`,
`TwoWayTransformer`); these builders only pass the configured numbers.
"""

from __future__ import annotations

from functools import partial
from typing import List

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from icmoe.sam.config import SamConfig


def build_image_encoder(cfg: SamConfig) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
    )


def build_prompt_encoder(cfg: SamConfig) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=cfg.out_chans,
        image_embedding_size=(cfg.grid, cfg.grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans,
    )


def build_mask_decoder(cfg: SamConfig) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=cfg.decoder_mask_outputs,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.out_chans,
            mlp_dim=cfg.decoder_mlp_dim,
            num_heads=cfg.decoder_heads,
        ),
        transformer_dim=cfg.out_chans,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )


def freeze_unused_heads(model: nn.Module) -> List[str]:
    """Freeze the mask decoders' IoU heads (returns their parameter names).

    Prompt-free decoding never uses their output, so they would get no gradient (and DDP
    would need find_unused_parameters); they do not count as trainable.
    """
    names = []
    for name, p in model.named_parameters():
        if ".iou_prediction_head." in f".{name}" and p.requires_grad:
            p.requires_grad_(False)
            names.append(name)
    return names
