"""The generic trainer: `train(TrainOptions(...))` or `python -m icmoe.train` (docs/training.md)."""

from icmoe.core.lazy import lazy_exports

_EXPORTS = {
    "Recipe": "icmoe.training.recipe",
    "TrainOptions": "icmoe.training.options",
    "default_run_dir": "icmoe.training.options",
    "train": "icmoe.training.trainer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
