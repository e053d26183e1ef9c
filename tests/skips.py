"""Why a GPU/TensorRT test cannot run on this host: one precise reason, shared by the test files."""

from __future__ import annotations

from typing import Optional

from engines.tensorrt import unavailable_reason


def tensorrt_gpu_missing() -> Optional[str]:
    """The reason TensorRT tests must skip here, or None where TensorRT and a CUDA GPU exist."""
    why = unavailable_reason()
    return f"needs TensorRT and a CUDA GPU: {why}" if why else None
