"""Inference engines with one interface (`engines.base.Engine`) and a name-to-class registry.

    from engines import load_engine
    with load_engine("build/icmoe-tiny", backend="onnxruntime", precision="fp16") as engine:
        out = engine.infer(images)   # {output name: NumPy array}, names from the build's manifest

Backends are imported lazily, so a missing optional library (TensorRT, OpenVINO) disables its
backend only.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional

from engines.base import BuildInfo, Engine, EngineError, InputError, check_input

# name -> "module:Class"; every class has `from_build(build_dir, **kw)`.
BACKENDS: Dict[str, str] = {
    "eager": "engines.eager:EagerEngine",
    "onnxruntime": "engines.onnxruntime:OnnxRuntimeEngine",
    "openvino": "engines.openvino:OpenVINOEngine",
    "tensorrt": "engines.tensorrt:TensorRTEngine",
    "torch-tensorrt": "engines.torch_tensorrt:TorchTensorRTEngine",
}


def engine_class(backend: str):
    """The engine class registered for `backend` (imported now).

    Raises:
      EngineError: unknown backend, or its module cannot be imported (e.g. no TensorRT).
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise EngineError(f"backend {backend!r} is unavailable here: {type(e).__name__}: {e}") from None


def load_engine(build_dir, backend: str = "onnxruntime", precision: Optional[str] = None, **kw) -> Engine:
    """Load an engine for a build directory (not yet activated).

    Arguments:
      build_dir: a directory written by `python -m export.build`.
      backend: a key of `BACKENDS`.
      precision: "fp32", "fp16" or "int8"; None takes the build's precision.
      kw: passed to the engine's `from_build` (e.g. `threads`, `expect`, `variant` for eager).

    Returns:
      Engine: call `activate()` or use it as a context manager.

    Raises:
      EngineError: unknown or unavailable backend, missing/damaged/mismatched artifacts.
    """
    return engine_class(backend).from_build(build_dir, precision=precision, **kw)


__all__ = [
    "BACKENDS",
    "BuildInfo",
    "Engine",
    "EngineError",
    "InputError",
    "check_input",
    "engine_class",
    "load_engine",
]
