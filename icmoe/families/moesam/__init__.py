"""MoE-SAM (the `moesam` family): SAM ViT-B with adapters, an expert-choice MoE feature-enhancing
block over every encoder block, and a self-prompting multi-class decoder.

    config.py   `MoESAMConfig`, the `vit_b` and `tiny` variants
    feb.py      the MoE feature-enhancing block (routing, experts, token attention, neck)
    lpeg.py     the lightweight prompt embedding generator
    model.py    `MoESAM` and `build_moesam`
    recipe.py   the loss, augmentations, recipes, the step, evaluation (`TrainingSpec`)
    family.py   `FAMILY`: the graph, precision and parity declarations

docs/moesam.md describes the method and the decisions taken where the paper and its code disagree.
"""

from icmoe.families.moesam.config import CONFIGS, MoESAMConfig
from icmoe.families.moesam.model import MoESAM, build_moesam

__all__ = ["CONFIGS", "MoESAM", "MoESAMConfig", "build_moesam"]
