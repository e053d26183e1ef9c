"""IC-MoE: a mixture of three SAM experts for medical image segmentation.

Public API: configurations (`get_config`, `CONFIGS`), the model (`build_icmoe`,
`ICMoE`, `NaiveICMoE`), the voting reference (`ppav`), losses, and checkpoints
(`save_checkpoint`, `load`).
"""

from icmoe.checkpoint import CheckpointError, load, save_checkpoint
from icmoe.config import CONFIGS, ICMoEConfig, get_config
from icmoe.model import ICMoE, NaiveICMoE, TrainOutput, build_icmoe
from icmoe.voting import Vote, ppav

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "ICMoE",
    "ICMoEConfig",
    "NaiveICMoE",
    "TrainOutput",
    "Vote",
    "build_icmoe",
    "get_config",
    "load",
    "ppav",
    "save_checkpoint",
]
