"""The two toy families declared: `toy` (binary) and `toy_labels` (three labels, as a multi-class family)."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
from torch import nn

from icmoe.core.parity import dice_per_image, flipped_report, logits_report
from icmoe.core.specs import BATCH, TensorSpec
from icmoe.families import Family, GraphSpec, ParitySpec, PrecisionSpec, Tolerances
from tests.icmoe.families.toy.config import toy_labels_micro, toy_labels_tiny, toy_tiny
from tests.icmoe.families.toy.model import ToyLabelsOutputs, ToyLabelsSegmenter, ToyOutputs, ToySegmenter

LABELS = ["background", "lesion", "rim"]


class ToyGraph(GraphSpec):
    def inputs(self, config: Any) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("image", "float32", (BATCH, 3, s, s))]

    def outputs(self, config: Any) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("logits", "float32", (BATCH, 1, s, s)), TensorSpec("mask", "uint8", (BATCH, 1, s, s))]

    def export_module(self, model: nn.Module) -> nn.Module:
        return ToyOutputs(model)


class ToyLabelsGraph(ToyGraph):
    def outputs(self, config: Any) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("logits", "float32", (BATCH, len(LABELS), s, s)),
                TensorSpec("mask", "uint8", (BATCH, 1, s, s), doc="label values 0..2 (argmax of logits)")]

    def export_module(self, model: nn.Module) -> nn.Module:
        return ToyLabelsOutputs(model)

    def class_names(self, config: Any) -> List[str]:
        return list(LABELS)

    def mask_rule(self, config: Any) -> str:
        return "argmax"  # its mask is the argmax of its logits (the binary toy declares none: nearest)


class ToyParity(ParitySpec):
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


def build_toy(config: Any, *, sam_checkpoint: Any = None) -> nn.Module:
    return ToySegmenter(config).eval()


def build_toy_labels(config: Any, *, sam_checkpoint: Any = None) -> nn.Module:
    return ToyLabelsSegmenter(config).eval()


FAMILY = Family(name="toy", title="Toy SAM", configs={"tiny": toy_tiny}, build=build_toy, graph=ToyGraph(),
                precision=PrecisionSpec(), parity=ToyParity())

LABELS_FAMILY = Family(name="toy_labels", title="Toy SAM, three labels",
                       configs={"tiny": toy_labels_tiny, "micro": toy_labels_micro}, build=build_toy_labels,
                       graph=ToyLabelsGraph(), precision=PrecisionSpec(), parity=ToyParity())
