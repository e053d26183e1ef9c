"""IC-MoE (the `icmoe` family): three SAM ViT-B experts with pixel-probability adaptive voting (PPAV).

    config.py    `ICMoEConfig`, the `vit_b` and `tiny` variants
    encoder.py   the shared frozen ViT and the naive per-expert encoders
    model.py     `ICMoE` (backbone stored once), `NaiveICMoE` (three full experts), `build_icmoe`
    voting/      PPAV: reference, fused Triton kernel, custom op, TensorRT plugin
    losses.py    CE + Dice + SgCL
    recipe.py    recipes, the training step, flips, evaluation (`TrainingSpec`)
    family.py    `FAMILY`: the graph, precision and parity declarations

docs/icmoe.md describes the method and the decisions taken where the paper is silent.
"""

from icmoe.families.icmoe.config import CONFIGS, ICMoEConfig
from icmoe.families.icmoe.model import ICMoE, NaiveICMoE, TrainOutput, build_icmoe
from icmoe.families.icmoe.voting import Vote, ppav

__all__ = ["CONFIGS", "ICMoE", "ICMoEConfig", "NaiveICMoE", "TrainOutput", "Vote", "build_icmoe", "ppav"]
