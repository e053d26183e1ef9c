"""SAM's backbone numbers, once: the ViT image encoder, the prompt encoder, the mask decoder and the adapters.

Every family's configuration derives from `SamConfig` and adds its own fields. The defaults
are SAM ViT-B at 256x256; `TINY` is the same structure at a few MB, for tests and CPU demos.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from icmoe.core.config import ConfigDict

# SAM's pixel statistics (RGB, 0..255).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# The `tiny` size variant every family offers: 4 blocks 64 wide on a 16x16 token grid at 128x128.
TINY: Dict[str, Any] = {
    "image_size": 128, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "window_size": 8,
    "global_attn_indexes": (1, 3), "out_chans": 64, "decoder_depth": 2, "decoder_heads": 4,
    "decoder_mlp_dim": 256, "iou_head_hidden_dim": 64,
}


@dataclass(frozen=True)
class SamConfig(ConfigDict):
    """The fields that shape SAM's parts; defaults are SAM ViT-B at 256x256."""

    name: str  # registry name the configuration was built from
    image_size: int = 256  # square input side in pixels
    patch_size: int = 16  # ViT patch side; the token grid is image_size // patch_size
    embed_dim: int = 768  # ViT width
    depth: int = 12  # number of ViT blocks
    num_heads: int = 12  # attention heads per ViT block
    mlp_ratio: float = 4.0  # ViT MLP hidden width / embed_dim
    window_size: int = 14  # windowed-attention side for the non-global blocks
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)  # blocks with global attention
    out_chans: int = 256  # neck output width = prompt embedding width = decoder width
    decoder_depth: int = 2  # TwoWayTransformer depth of the mask decoder
    decoder_heads: int = 8  # TwoWayTransformer heads
    decoder_mlp_dim: int = 2048  # TwoWayTransformer MLP width
    iou_head_hidden_dim: int = 256  # SAM's IoU head width (kept so SAM weights load)
    mask_in_chans: int = 16  # prompt encoder mask-input channels (kept so SAM weights load)
    adapter_ratio: float = 0.25  # adapter bottleneck / embed_dim (768 -> 192)
    adapter_mlp_scale: float = 0.5  # scale of the adapter that runs parallel to the MLP

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{self.depth - 1}")

    @property
    def grid(self) -> int:
        """Token grid side (16 for ViT-B at 256)."""
        return self.image_size // self.patch_size

    @property
    def adapter_dim(self) -> int:
        return int(self.embed_dim * self.adapter_ratio)

    @property
    def decoder_mask_outputs(self) -> int:
        """Multimask outputs of the mask decoder (SAM's 3); a family may decode more."""
        return 3
