"""Scoring models on datasets: the `Evaluation` result, binary and per-volume evaluations, metrics,
overlays, and a checkpoint on a split (`run_evaluation`; `python -m icmoe.evaluate`)."""

from icmoe.core.lazy import lazy_exports

_EXPORTS = {
    "Evaluation": "icmoe.evaluation.report",
    "binary_evaluation": "icmoe.evaluation.binary",
    "volume_evaluation": "icmoe.evaluation.volumes",
    "evaluate": "icmoe.evaluation.run",
    "run_evaluation": "icmoe.evaluation.run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
