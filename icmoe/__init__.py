"""icmoe: the toolkit that trains, exports, checks and deploys SAM-based mixture-of-experts segmenters.

The model families live in `icmoe.families` (`get_family("icmoe")`, `get_family("moesam")`); this
package's top level is only the toolkit: checkpoints of any family, the family registry and the errors
every command raises; the trainer is `icmoe.training`, the evaluation `icmoe.evaluation`. README.md is the map; docs/ has the topics.
"""

from icmoe.core.lazy import lazy_exports

# Imported on first use: a deployment process that only runs a graph (ONNX Runtime, OpenVINO) imports
# `icmoe.core` and `icmoe.data.images` and must not pay for torch.
_EXPORTS = {
    "CheckpointError": "icmoe.core.errors",
    "DataError": "icmoe.core.errors",
    "FamilyError": "icmoe.core.errors",
    "IcmoeError": "icmoe.core.errors",
    "load": "icmoe.checkpoint",
    "read_meta": "icmoe.checkpoint",
    "save_checkpoint": "icmoe.checkpoint",
    "family_names": "icmoe.families",
    "get_family": "icmoe.families",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
