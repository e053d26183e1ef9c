"""ONNX Runtime engine for the FP32 and FP16 graphs of a build directory.

Session settings are chosen for a fair CPU comparison with eager PyTorch: all graph
optimizations on, intra-op threads = the cores eager uses, sequential execution.
The artifact is checked against the manifest (size and sha256) before loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from engines.base import INPUT_NAME, OUTPUT_NAMES, Engine, EngineError
from engines.eager import _check_expect, default_threads

# precision -> artifact file in the build directory
ARTIFACTS = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}


def session_options(threads: Optional[int] = None, *, optimized_model: Optional[str] = None):
    """ORT session options used everywhere (engines, verify, benchmarks)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: the optimizer's notes are not for users
    if optimized_model:
        so.optimized_model_filepath = optimized_model
    return so


class OnnxRuntimeEngine(Engine):
    """An IC-MoE ONNX graph in ONNX Runtime.

    Arguments (keyword-only):
      path: the ONNX file.
      image_size: the graph's input side.
      batch_range: (min, max) batch the build allows, or None.
      precision: "fp32" or "fp16" (label only; the graph decides).
      threads: intra-op threads (default: the usable cores).
      providers: ORT execution providers (default CPU).
    """

    def __init__(self, *, path, image_size: int, batch_range=None, precision: str = "fp32",
                 threads: Optional[int] = None, providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(image_size=image_size, batch_range=batch_range)
        self.path = Path(path)
        self.precision = precision
        self.threads = threads or default_threads()
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.name = f"onnxruntime-{precision}"
        self.session = None

    @classmethod
    def from_build(cls, build_dir, *, precision: Optional[str] = None, expect=None, verify: bool = True,
                   **kw) -> "OnnxRuntimeEngine":
        """Load the graph of `precision` from a build directory, checked against its manifest.

        Arguments:
          build_dir: a build directory.
          precision: "fp32" (model.onnx) or "fp16" (model.fp16.onnx); None: the build's precision.
          expect: a model name (or ICMoEConfig) the build must be for.
          verify: compare the artifact's size and sha256 with the manifest.

        Raises:
          EngineError: no manifest, the artifact is missing, truncated, damaged, of another
            precision, or the build is for another model.
        """
        from export.manifest import ManifestError, artifact_path, read_manifest

        try:
            manifest = read_manifest(build_dir)
            precision = precision or manifest["precision"]
            if precision not in ARTIFACTS:
                raise EngineError(f"unknown precision {precision!r}; choose from {', '.join(ARTIFACTS)}")
            name = ARTIFACTS[precision]
            _check_expect(manifest, expect, build_dir)
            info = manifest["artifacts"].get(name)
            if info is None:
                have = sorted(a for a, i in manifest["artifacts"].items() if i.get("kind") == "onnx")
                raise EngineError(f"{build_dir}: no {precision} ONNX graph in this build (has: {', '.join(have) or 'none'})")
            if info.get("precision") != precision:
                raise EngineError(f"{build_dir}/{name}: manifest says precision {info.get('precision')!r}, not {precision!r}")
            path = artifact_path(build_dir, name, verify=verify)
        except ManifestError as e:
            raise EngineError(str(e)) from None
        b = manifest["batch"]
        return cls(path=path, image_size=int(manifest["image_size"]), batch_range=(int(b["min"]), int(b["max"])),
                   precision=precision, **kw)

    def _activate(self) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options(self.threads),
                                                providers=self.providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it ({_first_line(e)})") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or sorted(outputs) != sorted(OUTPUT_NAMES):
            raise EngineError(f"{self.path}: graph I/O {inputs} -> {outputs} is not an IC-MoE graph")
        shape = self.session.get_inputs()[0].shape
        if shape[1:] != [3, self.image_size, self.image_size]:
            raise EngineError(f"{self.path}: graph input shape {shape} does not match image size {self.image_size}")

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        outs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return dict(zip(OUTPUT_NAMES, outs))


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
