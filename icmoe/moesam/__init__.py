"""MoE-SAM (the `moesam` family): SAM ViT-B with adapters, an expert-choice MoE feature-enhancing
block over every encoder block, and a self-prompting multi-class decoder.

    config.py   `MoESAMConfig`, the `vit_b` and `tiny` variants
    feb.py      the MoE feature-enhancing block (routing, experts, token attention, neck)
    lpeg.py     the lightweight prompt embedding generator
    model.py    `MoESAM` and `build_moesam`

`icmoe.families.moesam` declares it to the generic pipeline; docs/moesam.md describes it.
"""

from icmoe.moesam.config import CONFIGS, MoESAMConfig, get_config
from icmoe.moesam.model import MoESAM, build_moesam

__all__ = ["CONFIGS", "MoESAM", "MoESAMConfig", "build_moesam", "get_config"]
