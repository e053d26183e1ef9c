"""TensorRT engine: `model.plan` of a build directory, run with TensorRT's Python runtime.

Device buffers are PyTorch CUDA tensors (no extra CUDA binding needed); inference
is `execute_async_v3` on a PyTorch stream. With `cuda_graphs=True` the enqueue
is captured once per batch size into a CUDA graph and replayed (static buffers).

The plan is checked before it is loaded: listed in manifest.json with a matching
size and sha256, kind "tensorrt", the requested precision, the expected model,
the same TensorRT version (unless version-compatible) and GPU compute capability
(unless hardware-compatible); and after loading, its I/O names and dtypes must
be the build's. Each mismatch is refused with one line.

Needs TensorRT and a CUDA GPU; not run in this project's CI (no GPU there):
tests/engines/test_tensorrt_engine.py runs on a GPU host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from engines.base import INPUT_NAME, OUTPUT_NAMES, Engine, EngineError

PLAN_NAME = "model.plan"
# TensorRT I/O dtype name (DataType.name) -> torch dtype name
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "UINT8": "uint8", "INT64": "int64", "BOOL": "bool"}
_EXPECTED = {INPUT_NAME: "float32", "logits": "float32", "mask": "uint8", "expert": "int32"}


class TensorRTEngine(Engine):
    """A serialized TensorRT engine behind the common `Engine` interface.

    Arguments (keyword-only):
      plan: path of the serialized engine (model.plan).
      image_size: input side S.
      batch_range: (min, max) batch of the engine's optimization profile.
      precision: label ("fp16"/"fp32").
      cuda_graphs: capture each batch size's enqueue in a CUDA graph and replay it.
      device: CUDA device index.
    """

    def __init__(self, *, plan: Path, image_size: int, batch_range: Optional[Tuple[int, int]] = None,
                 precision: str = "fp16", cuda_graphs: bool = False, device: int = 0) -> None:
        super().__init__(image_size=image_size, batch_range=batch_range)
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
                   device: int = 0, verify: bool = True, **kw) -> "TensorRTEngine":
        """The build's `model.plan`, checked against manifest.json, this TensorRT and this GPU.

        Arguments:
          build_dir: a build directory with a TensorRT engine.
          precision: required precision ("fp16"/"fp32"); None accepts the plan's.
          expect: a model name (or ICMoEConfig) the build must be for.
          cuda_graphs: replay CUDA graphs.
          verify: check size and sha256 of the plan.

        Raises:
          EngineError: one line naming the missing, damaged or mismatched part.
        """
        from export.manifest import ManifestError, artifact_path, read_manifest

        from engines.eager import _check_expect

        try:
            manifest = read_manifest(build_dir)
            plan = artifact_path(build_dir, PLAN_NAME, verify=verify)
        except ManifestError as e:
            raise EngineError(str(e)) from None
        _check_expect(manifest, expect, build_dir)
        info = manifest["artifacts"][PLAN_NAME]
        if info.get("kind") != "tensorrt":
            raise EngineError(f"{plan}: registered as {info.get('kind')!r}, not a TensorRT engine")
        have = info.get("precision", manifest["precision"])
        if precision is not None and precision != have:
            raise EngineError(f"{plan}: engine was built for {have}, not {precision}")
        check_runtime(info, plan)
        batch = info.get("batch") or manifest["batch"]
        return cls(plan=plan, image_size=int(manifest["image_size"]), batch_range=(int(batch["min"]), int(batch["max"])),
                   precision=have, cuda_graphs=cuda_graphs, device=device, **kw)

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
        want = {n: (d, n == INPUT_NAME) for n, d in _EXPECTED.items()}
        if io != want:
            raise EngineError(f"{self.plan}: engine I/O {io} differs from the IC-MoE contract {want}")
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
        import torch

        s = self.image_size
        dev = torch.device("cuda", self.device)
        bufs = {
            INPUT_NAME: torch.empty((batch, 3, s, s), dtype=torch.float32, device=dev),
            "logits": torch.empty((batch, 1, s, s), dtype=torch.float32, device=dev),
            "mask": torch.empty((batch, 1, s, s), dtype=torch.uint8, device=dev),
            "expert": torch.empty((batch,), dtype=torch.int32, device=dev),
        }
        return bufs

    def _bind(self, bufs: Dict[str, Any]) -> None:
        ctx = self.context
        if not ctx.set_input_shape(INPUT_NAME, tuple(bufs[INPUT_NAME].shape)):
            raise EngineError(f"the engine refused input shape {tuple(bufs[INPUT_NAME].shape)}")
        for name, t in bufs.items():
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise EngineError(f"could not bind tensor {name!r}")

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
                bufs[INPUT_NAME].copy_(torch.from_numpy(images), non_blocking=False)
                graph.replay()
            else:
                bufs = self._buffers(b)
                bufs[INPUT_NAME].copy_(torch.from_numpy(images))
                self._bind(bufs)
                self._enqueue()
            self.stream.synchronize()
            return {n: bufs[n].cpu().numpy() for n in OUTPUT_NAMES}


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
