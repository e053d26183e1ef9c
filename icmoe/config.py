"""Model configurations: a typed dataclass and a name-to-builder registry.

`vit_b` is the real IC-MoE (three SAM ViT-B experts); `tiny` keeps the same
structure at a few MB so tests and demos run in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Tuple

from icmoe.core.config import ConfigDict

# SAM's pixel statistics (RGB, 0..255); the model normalises inside forward.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ICMoEConfig(ConfigDict):
    family: ClassVar[str] = "icmoe"  # the model family (registry name) this configuration belongs to
    name: str  # registry name the configuration was built from
    image_size: int = 256  # square input side in pixels (256 for ISIC/BUSI, 512 for GlaS)
    patch_size: int = 16  # ViT patch side; the token grid is image_size // patch_size
    embed_dim: int = 768  # ViT width
    depth: int = 12  # number of ViT blocks
    num_heads: int = 12  # attention heads per ViT block
    mlp_ratio: float = 4.0  # ViT MLP hidden width / embed_dim
    window_size: int = 14  # windowed-attention side for the non-global blocks
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)  # blocks with global attention
    out_chans: int = 256  # neck output width = prompt embedding width = decoder width
    decoder_depth: int = 2  # TwoWayTransformer depth in each mask decoder
    decoder_heads: int = 8  # TwoWayTransformer heads
    decoder_mlp_dim: int = 2048  # TwoWayTransformer MLP width
    iou_head_hidden_dim: int = 256  # SAM's IoU head width (kept so SAM weights load)
    mask_in_chans: int = 16  # prompt encoder mask-input channels (kept so SAM weights load)
    adapter_ratio: float = 0.25  # adapter bottleneck / embed_dim (768 -> 192)
    adapter_mlp_scale: float = 0.5  # scale of the adapter that runs parallel to the MLP
    semantic_blocks: int = 2  # trailing ViT blocks the semantic expert fine-tunes
    alpha: float = 0.5  # fusion weight: z_final = z2 + alpha * z_chosen
    pixel_mean: Tuple[float, float, float] = SAM_PIXEL_MEAN  # RGB mean, 0..255 scale
    pixel_std: Tuple[float, float, float] = SAM_PIXEL_STD  # RGB std, 0..255 scale
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)  # free-form notes

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 0 < self.semantic_blocks <= self.depth:
            raise ValueError(f"semantic_blocks must be in 1..{self.depth}, got {self.semantic_blocks}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{self.depth - 1}")

    @property
    def grid(self) -> int:
        """Token grid side (16 for ViT-B at 256)."""
        return self.image_size // self.patch_size

    @property
    def trunk_depth(self) -> int:
        """Blocks shared by the basic and semantic experts (run once)."""
        return self.depth - self.semantic_blocks

    @property
    def adapter_dim(self) -> int:
        return int(self.embed_dim * self.adapter_ratio)

    @property
    def normalization(self) -> Dict[str, Any]:
        """What the model does to its RGB 0..255 input (recorded in checkpoints)."""
        return {"pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std), "input": "RGB 0..255"}

    @property
    def decoder_mask_outputs(self) -> int:
        """Multimask outputs of each mask decoder: SAM's 3 (the single-mask token is used)."""
        return 3


def vit_b() -> ICMoEConfig:
    """The paper's IC-MoE: three SAM ViT-B experts at 256x256."""
    return ICMoEConfig(
        name="vit_b",
        image_size=256,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        out_chans=256,
        decoder_depth=2,
        decoder_heads=8,
        decoder_mlp_dim=2048,
        iou_head_hidden_dim=256,
    )


def tiny() -> ICMoEConfig:
    """Same structure, a few MB: 4 blocks 64 wide on a 16x16 token grid at 128x128."""
    return ICMoEConfig(
        name="tiny",
        image_size=128,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=2,
        window_size=8,
        global_attn_indexes=(1, 3),
        out_chans=64,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
    )


CONFIGS: Dict[str, Callable[[], ICMoEConfig]] = {
    "vit_b": vit_b,
    "tiny": tiny,
}


def get_config(name: str, **overrides: Any) -> ICMoEConfig:
    """Look up a registered configuration, optionally overriding fields.

    Arguments:
      name (str): a key of `CONFIGS`.
      overrides: field values to change (e.g. `image_size=512` for GlaS).

    Returns:
      ICMoEConfig: the configuration.
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; choose from {', '.join(sorted(CONFIGS))}")
    cfg = CONFIGS[name]()
    return cfg.replace(**overrides) if overrides else cfg
