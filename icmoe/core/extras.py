"""Optional parts of the toolkit and the pip extra that installs each.

The base install (`pip install icmoe`) trains, evaluates, exports FP32 ONNX graphs and runs them with
eager PyTorch and ONNX Runtime. The rest comes with an extra (pyproject.toml):

    fp16      nvidia-modelopt's AutoCast and what it imports: the FP16 graph
    triton    tritonclient[http,grpc]: Triton model repositories and clients
    bench     matplotlib: the benchmark's plot
    dicom     pydicom: reading DICOM images
    openvino  openvino and nncf: the OpenVINO engine and the INT8 build
    tensorrt  tensorrt, torch-tensorrt and polygraphy: the GPU engines (NVIDIA GPU hosts)
    test      pytest, mypy and every extra above except tensorrt

Code that needs an extra imports it where it is used, through `require`, so a missing package is one
line naming the command that installs it, never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from icmoe.core.errors import IcmoeError


class MissingExtra(IcmoeError):
    """An optional package is not installed; the message names the extra that installs it (one line)."""


def install_hint(extra: str) -> str:
    """The command that installs an extra, e.g. "pip install 'icmoe[fp16]'"."""
    return f"pip install 'icmoe[{extra}]'"


def missing(purpose: str, extra: str, error: BaseException) -> str:
    """One line: what needs the extra, how to install it, and what failed to import."""
    return f"{purpose} needs the [{extra}] extra: {install_hint(extra)} ({type(error).__name__}: {error})"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtra naming the extra that installs it.

    Example:
      plt = require("matplotlib.pyplot", "bench", "the benchmark's plot")
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(missing(purpose, extra, e)) from None
