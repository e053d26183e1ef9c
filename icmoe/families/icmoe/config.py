"""IC-MoE's configurations: SAM's backbone fields (`icmoe.sam.config.SamConfig`) plus its own, and the
size variants by name (`vit_b`: the paper's three SAM ViT-B experts; `tiny`: the same structure at a few MB)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Tuple

from icmoe.sam.config import SAM_PIXEL_MEAN, SAM_PIXEL_STD, TINY, SamConfig


@dataclass(frozen=True)
class ICMoEConfig(SamConfig):
    family: ClassVar[str] = "icmoe"  # the model family (registry name) this configuration belongs to
    semantic_blocks: int = 2  # trailing ViT blocks the semantic expert fine-tunes
    alpha: float = 0.5  # fusion weight: z_final = z2 + alpha * z_chosen
    pixel_mean: Tuple[float, float, float] = SAM_PIXEL_MEAN  # RGB mean, 0..255 scale
    pixel_std: Tuple[float, float, float] = SAM_PIXEL_STD  # RGB std, 0..255 scale
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)  # free-form notes

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.semantic_blocks <= self.depth:
            raise ValueError(f"semantic_blocks must be in 1..{self.depth}, got {self.semantic_blocks}")

    @property
    def trunk_depth(self) -> int:
        """Blocks shared by the basic and semantic experts (run once)."""
        return self.depth - self.semantic_blocks

    @property
    def normalization(self) -> Dict[str, Any]:
        """What the model does to its RGB 0..255 input (recorded in checkpoints)."""
        return {"pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std), "input": "RGB 0..255"}


def vit_b() -> ICMoEConfig:
    """The paper's IC-MoE: three SAM ViT-B experts at 256x256 (SAM's ViT-B numbers are the defaults)."""
    return ICMoEConfig(name="vit_b")


def tiny() -> ICMoEConfig:
    """Same structure, a few MB: SAM's `TINY` backbone (4 blocks 64 wide, 16x16 tokens at 128x128)."""
    return ICMoEConfig(name="tiny", **TINY)


CONFIGS: Dict[str, Callable[[], ICMoEConfig]] = {
    "vit_b": vit_b,
    "tiny": tiny,
}
