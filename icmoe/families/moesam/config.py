"""MoE-SAM's configurations: SAM's backbone fields (`icmoe.sam.config.SamConfig`) plus the FEB's and
LPEG's, and the size variants by name (`vit_b`: the paper's, 7 classes as for MMWHS; `tiny`).

The number of classes C (foreground; the model outputs C+1 maps, 0 = background) and their
names are part of the configuration, so a checkpoint says what its labels mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Tuple

from icmoe.sam.config import TINY, SamConfig

LPEG_INPUTS = ("enhanced", "neck")


@dataclass(frozen=True)
class MoESAMConfig(SamConfig):
    family: ClassVar[str] = "moesam"
    num_classes: int = 7  # C foreground classes; outputs have C+1 channels
    class_names: Tuple[str, ...] = ()  # C names (label value = index + 1); empty: class1..classC
    # MoE feature-enhancing block (FEB)
    num_experts: int = 4  # E
    capacity: int = 2  # c: each expert picks k = c * N / E tokens of an image (N / 2)
    expert_ratio: int = 4  # expert hidden width / embed_dim (768 -> 3072)
    expert_dropout: float = 0.1  # after each expert, training only
    feb_heads: int = 8  # heads of the attention over all N = depth * grid^2 tokens (8 x 96)
    # lightweight prompt embedding generator (LPEG)
    lpeg_hidden: int = 16  # bottleneck width
    lpeg_input: str = "enhanced"  # "enhanced": E0 + FEB (the paper); "neck": E0 (the public code)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for num_classes {self.num_classes}")
        if self.lpeg_input not in LPEG_INPUTS:
            raise ValueError(f"lpeg_input must be one of {', '.join(LPEG_INPUTS)}, got {self.lpeg_input!r}")
        if self.embed_dim % self.feb_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by feb_heads {self.feb_heads}")
        if (self.capacity * self.tokens) % self.num_experts:
            raise ValueError(f"capacity * tokens ({self.capacity} * {self.tokens}) is not divisible by "
                             f"{self.num_experts} experts")

    @property
    def tokens(self) -> int:
        """N: tokens the FEB routes per image (every block's grid: 12 x 256 = 3072 at 256)."""
        return self.depth * self.grid * self.grid

    @property
    def k(self) -> int:
        """Tokens each expert picks per image: c * N / E (1536 at 256, 1176 at 224)."""
        return self.capacity * self.tokens // self.num_experts

    @property
    def normalization(self) -> Dict[str, Any]:
        """What the model does to its RGB 0..255 input (recorded in checkpoints)."""
        return {"input": "RGB 0..255", "scale": 1 / 255, "pixel_mean": None, "pixel_std": None}

    @property
    def decoder_mask_outputs(self) -> int:
        """The decoder has 1 + C mask tokens; token 0 is the background map."""
        return self.num_classes

    @property
    def labels(self) -> Tuple[str, ...]:
        """Names of the C+1 label values, 0 = background."""
        names = self.class_names or tuple(f"class{i}" for i in range(1, self.num_classes + 1))
        return ("background",) + tuple(names)


def vit_b() -> MoESAMConfig:
    """The paper's MoE-SAM: SAM ViT-B at 256x256 (the defaults), 4 experts, 7 classes (MMWHS) unless overridden."""
    return MoESAMConfig(name="vit_b")


def tiny() -> MoESAMConfig:
    """Same structure, a few MB: SAM's `TINY` backbone, 3 classes, 1024 routed tokens."""
    return MoESAMConfig(name="tiny", num_classes=3, feb_heads=4, **TINY)


CONFIGS: Dict[str, Callable[[], MoESAMConfig]] = {
    "vit_b": vit_b,
    "tiny": tiny,
}
