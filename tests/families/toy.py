"""A toy third model family, defined in the test tree alone: one SAM segmenter, prompt-free.

It exists to prove that a family plugs into the pipeline (build, verify, engines, Triton
repository, benchmark) without a line in `export/` or `engines/`: the registry finds it by
name (`register_family("toy", "tests.families.toy:FAMILY")`, or the ICMOE_FAMILIES
variable in subprocesses). It reuses SAM's parts and IC-MoE's configuration fields.

    image (B, 3, S, S) float32 RGB 0..255  ->  logits (B, 1, S, S) float32, mask (B, 1, S, S) uint8

Its multi-class sibling `toy_labels` (`LABELS_FAMILY`, registered as
"toy_labels=tests.families.toy:LABELS_FAMILY") decodes SAM's three multimask outputs as three
classes and takes their argmax, the way a multi-class family (label names from `class_names`) does:

    image (B, 3, S, S)  ->  logits (B, 3, S, S) float32, mask (B, 1, S, S) uint8 labels 0..2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from icmoe.config import ICMoEConfig, tiny
from icmoe.core.parity import dice_per_image, flipped_report, logits_report
from icmoe.core.specs import BATCH, TensorSpec
from icmoe.families import Family, Tolerances
from icmoe.sam import build_image_encoder, build_mask_decoder, build_prompt_encoder


@dataclass(frozen=True)
class ToyConfig(ICMoEConfig):
    family: ClassVar[str] = "toy"


def toy_tiny() -> ToyConfig:
    return ToyConfig(**{**tiny().to_dict(), "name": "tiny", "depth": 2, "global_attn_indexes": (1,)})


class ToySegmenter(nn.Module):
    """SAM's ViT, prompt encoder and mask decoder; images (B, 3, S, S) -> logits (B, 1, S, S)."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = build_image_encoder(config)
        self.prompt_encoder = build_prompt_encoder(config)
        self.decoder = build_mask_decoder(config)
        self.register_buffer("mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    multimask = False  # the labels sibling decodes SAM's three multimask outputs instead of one

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        y = self.vit((images - self.mean) / self.std)  # (B, C, h, w)
        c, h, w = y.shape[1:]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, c, 1, 1).expand(1, c, h, w)
        low, _ = self.decoder(image_embeddings=y, image_pe=self.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=y.new_zeros((1, 0, c)), dense_prompt_embeddings=dense,
                              multimask_output=self.multimask)  # (B, K, 4h, 4w), K = 1 or 3
        s = self.config.image_size
        return F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)  # (B, K, S, S)


class ToyOutputs(nn.Module):
    def __init__(self, model: ToySegmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, (logits > 0).to(torch.uint8)


class ToyFamily(Family):
    name = "toy"
    title = "Toy SAM"
    configs = {"tiny": toy_tiny}

    def config_from_dict(self, d: Dict[str, Any]) -> ToyConfig:
        return ToyConfig.from_dict(d)

    def build(self, config: Any, *, sam_checkpoint=None) -> nn.Module:
        return ToySegmenter(config).eval()

    def inputs(self, config: ToyConfig) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("image", "float32", (BATCH, 3, s, s))]

    def outputs(self, config: ToyConfig) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("logits", "float32", (BATCH, 1, s, s)), TensorSpec("mask", "uint8", (BATCH, 1, s, s))]

    def export_module(self, model: nn.Module) -> nn.Module:
        return ToyOutputs(model)

    def synthetic_inputs(self, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:image_size, :image_size] / image_size
        disc = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.1).astype(np.float32)
        return (disc * 200 + rng.random((n, 3, image_size, image_size)) * 55).astype(np.float32)

    def tolerances(self, precision: str) -> Tolerances:
        if precision == "fp32":
            return Tolerances(atol=1e-3, rtol=1e-4, max_flipped=1e-4)
        return Tolerances(atol=1e-5, rtol=8e-3, scaled_atol=8e-3, max_flipped=5e-3)

    def compare(self, reference, candidate, tolerances: Tolerances) -> Dict[str, Any]:
        logits = logits_report(reference["logits"], candidate["logits"], atol=tolerances.atol,
                               rtol=tolerances.rtol, scaled_atol=tolerances.scaled_atol)
        flips = flipped_report(reference["mask"], candidate["mask"])
        report = {"max_abs_logit": logits.get("max_abs"), "logits_worst_ratio": logits.get("worst_ratio"),
                  **flips, "min_dice": float(dice_per_image(reference["mask"], candidate["mask"]).min())}
        report["passed"] = bool(logits["within"] and flips["flipped"] <= tolerances.max_flipped)
        return report


FAMILY = ToyFamily()


# ---------------------------------------------------------------- the multi-class sibling

LABELS = ["background", "lesion", "rim"]


@dataclass(frozen=True)
class ToyLabelsConfig(ICMoEConfig):
    family: ClassVar[str] = "toy_labels"


def toy_labels_tiny() -> ToyLabelsConfig:
    return ToyLabelsConfig(**toy_tiny().to_dict())


def toy_labels_micro() -> ToyLabelsConfig:
    """One ViT block and one decoder layer at 64x64: the quickest to compile ahead of time."""
    return ToyLabelsConfig(**{**toy_tiny().to_dict(), "name": "micro", "image_size": 64, "depth": 1,
                              "semantic_blocks": 1, "global_attn_indexes": (0,), "decoder_depth": 1})


class ToyLabelsSegmenter(ToySegmenter):
    """images (B, 3, S, S) -> logits (B, 3, S, S), one channel per label of `LABELS`."""

    multimask = True


class ToyLabelsOutputs(ToyOutputs):
    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)  # (B, 3, S, S)
        return logits, logits.argmax(1, keepdim=True).to(torch.uint8)  # (B, 1, S, S) labels 0..2


class ToyLabelsFamily(ToyFamily):
    name = "toy_labels"
    title = "Toy SAM, three labels"
    configs = {"tiny": toy_labels_tiny, "micro": toy_labels_micro}

    def config_from_dict(self, d: Dict[str, Any]) -> ToyLabelsConfig:
        return ToyLabelsConfig.from_dict(d)

    def build(self, config: Any, *, sam_checkpoint=None) -> nn.Module:
        return ToyLabelsSegmenter(config).eval()

    def class_names(self, config: Any) -> List[str]:
        return list(LABELS)

    def outputs(self, config: ToyLabelsConfig) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("logits", "float32", (BATCH, len(LABELS), s, s)),
                TensorSpec("mask", "uint8", (BATCH, 1, s, s), doc="label values 0..2 (argmax of logits)")]

    def export_module(self, model: nn.Module) -> nn.Module:
        return ToyLabelsOutputs(model)


LABELS_FAMILY = ToyLabelsFamily()
