"""Why a GPU/TensorRT test cannot run on this host: one precise reason, shared by the test files."""

from __future__ import annotations

from typing import Optional


def tensorrt_gpu_missing() -> Optional[str]:
    """The reason TensorRT tests must skip here, or None where TensorRT and a CUDA GPU exist."""
    try:
        import tensorrt as trt

        if not hasattr(trt, "Builder"):
            return "needs TensorRT: `import tensorrt` found no runtime (stub or namespace package)"
    except Exception as e:  # ImportError, or a broken install
        return f"needs TensorRT: `import tensorrt` failed ({type(e).__name__}: {e})"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False"
    return None
