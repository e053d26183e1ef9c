"""torch-tensorrt engine: the build's `model.trt.ts` (TorchScript with embedded TensorRT engines).

The module is what `export.torch_tensorrt` compiled from the build's eager model; it
returns the outputs in the manifest's order. Loading it needs the torch-tensorrt runtime
(`import torch_tensorrt` registers its TorchScript ops) and a CUDA GPU; checked like every
engine: listed in manifest.json with a matching size and sha256, kind "torch_tensorrt",
the requested precision and the expected model.

Not run in this project's CI (no GPU there): tests/engines/test_torch_tensorrt_engine.py
runs on a GPU host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from engines.base import BuildInfo, Engine, EngineError
from icmoe.core.extras import missing
from icmoe.core.manifest import TORCH_TENSORRT_NAME


class TorchTensorRTEngine(Engine):
    """A torch-tensorrt TorchScript module behind the common `Engine` interface.

    Arguments (keyword-only):
      path: the TorchScript file (model.trt.ts).
      inputs, outputs, batch_range: from the manifest.
      precision: label ("fp16"/"fp32").
      device: CUDA device index.
    """

    def __init__(self, *, path: Path, inputs, outputs, batch_range=None, precision: str = "fp16",
                 device: int = 0) -> None:
        super().__init__(inputs=inputs, outputs=outputs, batch_range=batch_range)
        self.path = Path(path)
        self.precision = precision
        self.device = device
        self.name = f"torch-tensorrt-{precision}"
        self.module: Any = None

    @classmethod
    def from_build(cls, build_dir, *, precision: Optional[str] = None, expect=None, device: int = 0,
                   verify: bool = True) -> "TorchTensorRTEngine":
        """The build's `model.trt.ts`, checked against manifest.json.

        Raises:
          EngineError: missing, damaged, of another precision, or for another model.
        """
        info = BuildInfo(build_dir, expect=expect)
        path, _, have, specs = info.compiled(TORCH_TENSORRT_NAME, kind="torch_tensorrt", precision=precision,
                                             verify=verify)
        return cls(path=path, precision=have, device=device, **specs)

    def _activate(self) -> None:
        import torch

        try:
            import torch_tensorrt  # noqa: F401  (registers the TensorRT TorchScript ops)
        except ImportError as e:
            raise EngineError(missing("the torch-tensorrt engine", "tensorrt", e)) from None
        if not torch.cuda.is_available():
            raise EngineError("the torch-tensorrt engine needs a CUDA GPU (torch.cuda.is_available() is False)")
        try:
            self.module = torch.jit.load(str(self.path), map_location=f"cuda:{self.device}").eval()
        except Exception as e:  # TorchScript raises RuntimeError with a long C++ trace
            raise EngineError(f"{self.path}: cannot be loaded ({str(e).strip().splitlines()[0][:300]})") from None

    def _deactivate(self) -> None:
        self.module = None

    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outs = self.module(torch.from_numpy(images).to(f"cuda:{self.device}"))
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        if len(outs) != len(self.outputs):
            raise EngineError(f"{self.path}: returned {len(outs)} outputs, the manifest lists {len(self.outputs)}")
        return {spec.name: out.cpu().numpy().astype(spec.np_dtype, copy=False) for spec, out in zip(self.outputs, outs)}
