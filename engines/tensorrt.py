"""TensorRT engine: `model.plan` of a build directory, run with TensorRT's Python runtime.

Details: docs/gpu.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from engines.base import BuildInfo, Engine, EngineError
from icmoe.core.extras import install_hint
from icmoe.core.manifest import PLAN_NAME

# TensorRT I/O dtype name (DataType.name) -> NumPy/torch dtype name
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "UINT8": "uint8", "INT64": "int64", "BOOL": "bool"}


def tensorrt_version() -> Tuple[int, int]:
    """(major, minor) of the installed TensorRT.

    Raises:
      ImportError: TensorRT is missing, or is a stub-only/namespace package without a version.
    """
    import tensorrt as trt

    version = getattr(trt, "__version__", None)
    if not version or not hasattr(trt, "Builder"):
        raise ImportError("`import tensorrt` found no TensorRT runtime (a stub or namespace package?)")
    major, minor = (int(p) for p in version.split(".")[:2])
    return major, minor


def unavailable_reason() -> Optional[str]:
    """Why TensorRT engines cannot be built or run here, or None where TensorRT and a CUDA GPU exist.

    Returns:
      "TensorRT not importable (...)" (missing, broken, or a stub/namespace package),
      "no CUDA GPU (...)", or None.
    """
    try:
        tensorrt_version()
    except Exception as e:  # ImportError, or a broken install
        return f"TensorRT not importable ({type(e).__name__}: {e}; {install_hint('tensorrt')})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


class TensorRTEngine(Engine):
    """A serialized TensorRT engine behind the common `Engine` interface.

    Arguments (keyword-only):
      plan: path of the serialized engine (model.plan).
      inputs, outputs: the graph's tensor specs (from the manifest).
      batch_range: (min, max) batch of the engine's optimization profile.
      precision: label ("fp16"/"fp32").
      cuda_graphs: capture each batch size's enqueue in a CUDA graph and replay it.
      device: CUDA device index.
    """

    def __init__(self, *, plan: Path, inputs, outputs, batch_range: Optional[Tuple[int, int]] = None,
                 precision: str = "fp16", cuda_graphs: bool = False, device: int = 0) -> None:
        super().__init__(inputs=inputs, outputs=outputs, batch_range=batch_range)
        self.plan = Path(plan)
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self.device = device
        self.name = f"tensorrt-{precision}" + ("-graphs" if cuda_graphs else "")
        self.engine: Any = None
        self.context: Any = None
        self._graphs: Dict[int, Tuple[Any, Dict[str, Any]]] = {}

    @classmethod
    def from_build(cls, build_dir, *, precision: Optional[str] = None, expect=None, cuda_graphs: bool = False,
                   device: int = 0, verify: bool = True) -> "TensorRTEngine":
        """The build's `model.plan`, checked against manifest.json, this TensorRT and this GPU.

        Arguments:
          build_dir: a build directory with a TensorRT engine.
          precision: required precision ("fp16"/"fp32"); None accepts the plan's.
          expect: what the build must be for (see `icmoe.families.check_expected`).
          cuda_graphs: replay CUDA graphs.
          verify: check size and sha256 of the plan.

        Raises:
          EngineError: one line naming the missing, damaged or mismatched part.
        """
        info = BuildInfo(build_dir, expect=expect)
        plan, entry, have, specs = info.compiled(PLAN_NAME, kind="tensorrt", precision=precision, verify=verify)
        check_runtime(entry, plan)
        return cls(plan=plan, precision=have, cuda_graphs=cuda_graphs, device=device, **specs)

    # ------------------------------------------------------------------ lifecycle

    def _activate(self) -> None:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise EngineError("the TensorRT engine needs a CUDA GPU (torch.cuda.is_available() is False)")
        torch.cuda.set_device(self.device)
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            raise EngineError(f"{self.plan}: TensorRT could not deserialize the engine (damaged, or built by another version/GPU)")
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            io[name] = (_DTYPES.get(engine.get_tensor_dtype(name).name, "?"), engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
        want = {s.name: (s.dtype, True) for s in self.inputs}
        want.update({s.name: (s.dtype, False) for s in self.outputs})
        if io != want:
            raise EngineError(f"{self.plan}: engine I/O {io} differs from the manifest's {want}")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        self._graphs = {}

    def _deactivate(self) -> None:
        self._graphs = {}
        self.context = None
        self.engine = None

    # ------------------------------------------------------------------ inference

    def _buffers(self, batch: int) -> Dict[str, Any]:
        """Device tensors for one batch size: the input's shape is set on the context, and every
        output is sized from the shape TensorRT then reports for it (and the engine's dtype)."""
        import torch

        dev = torch.device("cuda", self.device)
        spec = self.inputs[0]
        shape = spec.concrete(batch)
        if not self.context.set_input_shape(spec.name, shape):
            raise EngineError(f"the engine refused input shape {shape}")
        bufs = {spec.name: torch.empty(shape, dtype=getattr(torch, spec.dtype), device=dev)}
        for out in self.outputs:
            dims = tuple(self.context.get_tensor_shape(out.name))
            if any(d < 0 for d in dims):
                raise EngineError(f"TensorRT reports no concrete shape for output {out.name!r} ({dims})")
            dtype = _DTYPES.get(self.engine.get_tensor_dtype(out.name).name, out.dtype)
            bufs[out.name] = torch.empty(dims, dtype=getattr(torch, dtype), device=dev)
        return bufs

    def _bind(self, bufs: Dict[str, Any]) -> None:
        ctx = self.context
        name = self.input_name
        if not ctx.set_input_shape(name, tuple(bufs[name].shape)):
            raise EngineError(f"the engine refused input shape {tuple(bufs[name].shape)}")
        for key, t in bufs.items():
            if not ctx.set_tensor_address(key, t.data_ptr()):
                raise EngineError(f"could not bind tensor {key!r}")

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError("TensorRT failed to enqueue the inference")

    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        import torch

        b = images.shape[0]
        with torch.cuda.stream(self.stream):
            if self.cuda_graphs:
                if b not in self._graphs:
                    bufs = self._buffers(b)
                    self._bind(bufs)
                    self._enqueue()  # TensorRT needs one plain enqueue before capture (shape-dependent setup)
                    self.stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self._enqueue()
                    self._graphs[b] = (graph, bufs)
                graph, bufs = self._graphs[b]
                self._bind(bufs)
                bufs[self.input_name].copy_(torch.from_numpy(images), non_blocking=False)
                graph.replay()
            else:
                bufs = self._buffers(b)
                bufs[self.input_name].copy_(torch.from_numpy(images))
                self._bind(bufs)
                self._enqueue()
            self.stream.synchronize()
            return {n: bufs[n].cpu().numpy() for n in self.output_names}


def check_runtime(info: Dict[str, Any], plan: Path) -> None:
    """Refuse a plan built by another TensorRT version or for another GPU (unless built compatible).

    Raises:
      EngineError: TensorRT missing, version or compute-capability mismatch.
    """
    try:
        import tensorrt as trt

        version = trt.__version__
    except (ImportError, AttributeError) as e:
        raise EngineError(f"TensorRT is not available here: {e}") from None
    built = info.get("tensorrt")
    if built and built != version and not info.get("version_compatible"):
        raise EngineError(f"{plan}: built with TensorRT {built}, this is {version} (rebuild, or build version-compatible)")
    import torch

    if not torch.cuda.is_available():
        raise EngineError("the TensorRT engine needs a CUDA GPU (torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}.{minor}"
    if info.get("compute_capability") not in (None, cc) and not info.get("hardware_compatible"):
        raise EngineError(f"{plan}: built for compute capability {info['compute_capability']}, this GPU is {cc}")
