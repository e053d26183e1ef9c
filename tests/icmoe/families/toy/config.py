"""The toy families' configurations: SAM's backbone fields and the pixel statistics they normalise with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Tuple

from icmoe.sam.config import SAM_PIXEL_MEAN, SAM_PIXEL_STD, TINY, SamConfig


@dataclass(frozen=True)
class ToyConfig(SamConfig):
    family: ClassVar[str] = "toy"
    pixel_mean: Tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: Tuple[float, float, float] = SAM_PIXEL_STD

    @property
    def normalization(self) -> Dict[str, Any]:
        return {"pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std), "input": "RGB 0..255"}


@dataclass(frozen=True)
class ToyLabelsConfig(ToyConfig):
    family: ClassVar[str] = "toy_labels"


def toy_tiny() -> ToyConfig:
    """SAM's TINY backbone with two blocks."""
    return ToyConfig(name="tiny", **{**TINY, "depth": 2, "global_attn_indexes": (1,)})


def toy_labels_tiny() -> ToyLabelsConfig:
    return ToyLabelsConfig(**toy_tiny().to_dict())


def toy_labels_micro() -> ToyLabelsConfig:
    """One ViT block and one decoder layer at 64x64: the quickest to compile ahead of time."""
    return ToyLabelsConfig(**{**toy_tiny().to_dict(), "name": "micro", "image_size": 64, "depth": 1,
                              "global_attn_indexes": (0,), "decoder_depth": 1})
