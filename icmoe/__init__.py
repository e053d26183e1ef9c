"""IC-MoE: a mixture of three SAM experts for medical image segmentation.

Public API: configurations (`get_config`, `CONFIGS`), the model (`build_icmoe`,
`ICMoE`, `NaiveICMoE`), the voting reference (`ppav`), losses, and checkpoints
(`save_checkpoint`, `load`).
"""

from icmoe.core.lazy import lazy_exports

# Imported on first use: a deployment process that only runs a graph (ONNX Runtime, OpenVINO) imports
# `icmoe.core` and `icmoe.data.images` and must not pay for torch.
_EXPORTS = {
    "CheckpointError": "icmoe.checkpoint",
    "load": "icmoe.checkpoint",
    "save_checkpoint": "icmoe.checkpoint",
    "CONFIGS": "icmoe.config",
    "ICMoEConfig": "icmoe.config",
    "get_config": "icmoe.config",
    "ICMoE": "icmoe.model",
    "NaiveICMoE": "icmoe.model",
    "TrainOutput": "icmoe.model",
    "build_icmoe": "icmoe.model",
    "Vote": "icmoe.voting",
    "ppav": "icmoe.voting",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
