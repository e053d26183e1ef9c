"""ONNX Runtime engine for the FP32, FP16 and INT8 (QDQ) graphs of a build directory (any model family).

Session settings are chosen for a fair CPU comparison with eager PyTorch: all graph
optimizations on, intra-op threads = the cores eager uses, sequential execution. For throughput
(`streams` > 1) the one session runs that many requests at once, each on its share of the threads
(ONNX Runtime's `run` is thread-safe; the weights are held once).
The artifact is checked against the manifest (size and sha256) before loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from engines.base import BuildInfo, Engine, EngineError, default_threads
from icmoe.core.manifest import ONNX_GRAPHS


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
    """A build's ONNX graph in ONNX Runtime.

    Arguments (keyword-only):
      path: the ONNX file.
      inputs, outputs: the graph's tensor specs (from the manifest).
      batch_range: (min, max) batch the build allows, or None.
      precision: "fp32", "fp16" or "int8" (label only; the graph decides).
      threads: intra-op threads over all streams (default: the usable cores).
      providers: ORT execution providers (default CPU).
      streams: requests run at once from as many threads (throughput), each with threads // streams
        intra-op threads; 1 (default): one request with every thread (latency).
    """

    def __init__(self, *, path, inputs, outputs, batch_range=None, precision: str = "fp32",
                 threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 streams: int = 1) -> None:
        super().__init__(inputs=inputs, outputs=outputs, batch_range=batch_range)
        if int(streams) < 1:
            raise EngineError(f"streams must be >= 1, got {streams}")
        self.path = Path(path)
        self.precision = precision
        self.threads = threads or default_threads()
        self.n_streams = min(int(streams), self.threads)
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.name = f"onnxruntime-{precision}"
        self.session = None

    @classmethod
    def from_build(cls, build_dir, *, precision: Optional[str] = None, expect=None, verify: bool = True,
                   **kw) -> "OnnxRuntimeEngine":
        """Load the graph of `precision` from a build directory, checked against its manifest.

        Arguments:
          build_dir: a build directory.
          precision: "fp32" (model.onnx), "fp16" (model.fp16.onnx) or "int8" (model.int8.onnx, the QDQ graph);
            None: the build's precision.
          expect: what the build must be for (see `icmoe.families.check_expected`).
          verify: compare the artifact's size and sha256 with the manifest.

        Raises:
          EngineError: no manifest, the artifact is missing, truncated, damaged, of another
            precision, or the build is for another model.
        """
        info = BuildInfo(build_dir, expect=expect)
        precision = precision or info.manifest["precision"]
        if precision not in ONNX_GRAPHS:
            raise EngineError(f"unknown precision {precision!r}; choose from {', '.join(ONNX_GRAPHS)}")
        name = ONNX_GRAPHS[precision]
        entry = info.manifest["artifacts"].get(name)
        if entry is None:
            have = sorted(a for a, i in info.manifest["artifacts"].items() if i.get("kind") == "onnx")
            raise EngineError(f"{build_dir}: no {precision} ONNX graph in this build (has: {', '.join(have) or 'none'})")
        if entry.get("precision") != precision:
            raise EngineError(f"{build_dir}/{name}: manifest says precision {entry.get('precision')!r}, not {precision!r}")
        return cls(path=info.artifact(name, verify=verify), precision=precision, **info.specs(), **kw)

    def _activate(self) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(self.path), providers=self.providers,
                                                sess_options=session_options(max(1, self.threads // self.n_streams)))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it ({_first_line(e)})") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [s.name for s in self.inputs] or sorted(outputs) != sorted(self.output_names):
            raise EngineError(f"{self.path}: graph I/O {inputs} -> {outputs} differs from the manifest's "
                              f"{[s.name for s in self.inputs]} -> {self.output_names}")
        shape = self.session.get_inputs()[0].shape
        if list(shape[1:]) != list(self.inputs[0].shape[1:]):
            raise EngineError(f"{self.path}: graph input shape {shape} does not match the manifest's "
                              f"{list(self.inputs[0].shape)}")

    def _deactivate(self) -> None:
        self.session = None

    @property
    def streams(self) -> int:
        return self.n_streams

    def settings(self) -> Dict[str, Any]:
        return {"threads": self.threads, "streams": self.n_streams,
                "intra_op_threads": max(1, self.threads // self.n_streams)}

    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: images})
        return dict(zip(self.output_names, outs))


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__
