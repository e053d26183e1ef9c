"""MoE-SAM configurations: a typed dataclass and a name-to-builder registry.

`vit_b` is the paper's model (SAM ViT-B at 256x256, 7 classes as for MMWHS by default);
`tiny` keeps every part of the structure at small widths, for tests and the CPU demo.
The number of classes C (foreground; the model outputs C+1 maps, 0 = background) and their
names are part of the configuration, so a checkpoint says what its labels mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Tuple

from icmoe.core.config import ConfigDict

LPEG_INPUTS = ("enhanced", "neck")


@dataclass(frozen=True)
class MoESAMConfig(ConfigDict):
    family: ClassVar[str] = "moesam"
    name: str
    num_classes: int = 7  # C foreground classes; outputs have C+1 channels
    class_names: Tuple[str, ...] = ()  # C names (label value = index + 1); empty: class1..classC
    image_size: int = 256  # square input side (Synapse: 224)
    # SAM ViT image encoder (frozen) and its adapters (trainable), as for IC-MoE
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256  # neck width = prompt embedding width = decoder width
    adapter_ratio: float = 0.25  # adapter bottleneck / embed_dim (768 -> 192)
    adapter_mlp_scale: float = 0.5  # scale of the adapter parallel to the MLP
    # MoE feature-enhancing block (FEB)
    num_experts: int = 4  # E
    capacity: int = 2  # c: each expert picks k = c * N / E tokens of an image (N / 2)
    expert_ratio: int = 4  # expert hidden width / embed_dim (768 -> 3072)
    expert_dropout: float = 0.1  # after each expert, training only
    feb_heads: int = 8  # heads of the attention over all N = depth * grid^2 tokens (8 x 96)
    # lightweight prompt embedding generator (LPEG)
    lpeg_hidden: int = 16  # bottleneck width
    lpeg_input: str = "enhanced"  # "enhanced": E0 + FEB (the paper); "neck": E0 (the public code)
    # SAM mask decoder (C+1 mask tokens) and prompt encoder (only its no-mask embedding is used)
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256  # IoU head kept so SAM weights load; its output is unused
    mask_in_chans: int = 16

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
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
    def grid(self) -> int:
        """Token grid side (16 for ViT-B at 256)."""
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """N: tokens the FEB routes per image (every block's grid: 12 x 256 = 3072 at 256)."""
        return self.depth * self.grid * self.grid

    @property
    def k(self) -> int:
        """Tokens each expert picks per image: c * N / E (1536 at 256, 1176 at 224)."""
        return self.capacity * self.tokens // self.num_experts

    @property
    def adapter_dim(self) -> int:
        return int(self.embed_dim * self.adapter_ratio)

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
    """The paper's MoE-SAM: SAM ViT-B at 256x256, 4 experts, 7 classes (MMWHS) unless overridden."""
    return MoESAMConfig(
        name="vit_b",
        num_classes=7,
        image_size=256,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        out_chans=256,
        num_experts=4,
        capacity=2,
        expert_ratio=4,
        feb_heads=8,
        decoder_depth=2,
        decoder_heads=8,
        decoder_mlp_dim=2048,
        iou_head_hidden_dim=256,
    )


def tiny() -> MoESAMConfig:
    """Same structure, a few MB: 4 blocks 64 wide on a 16x16 grid at 128x128, 1024 routed tokens."""
    return MoESAMConfig(
        name="tiny",
        num_classes=3,
        image_size=128,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=2,
        window_size=8,
        global_attn_indexes=(1, 3),
        out_chans=64,
        num_experts=4,
        capacity=2,
        expert_ratio=4,
        feb_heads=4,
        lpeg_hidden=16,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=256,
        iou_head_hidden_dim=64,
    )


CONFIGS: Dict[str, Callable[[], MoESAMConfig]] = {
    "vit_b": vit_b,
    "tiny": tiny,
}


def get_config(name: str, **overrides: Any) -> MoESAMConfig:
    """A registered configuration with fields overridden (e.g. `num_classes=13` for BTCV)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown MoE-SAM config {name!r}; choose from {', '.join(sorted(CONFIGS))}")
    cfg = CONFIGS[name]()
    return cfg.replace(**overrides) if overrides else cfg
