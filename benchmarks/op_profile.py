"""Where an engine's time goes, by operator type, from the runtime's own profiler.

- ONNX Runtime: a session with `enable_profiling`; the trace's node events (`*_kernel_time`) summed by
  `op_name`.
- OpenVINO: the compiled model with `PERF_COUNT`; `InferRequest.profiling_info` summed by node type
  (OpenVINO fuses nodes: a type is what the plugin executed, e.g. FullyConnected, MatMul, Eltwise).
- Eager PyTorch: `torch.profiler` on the CPU, self time per aten operator.

Each profiles `runs` inferences of one batch after one untimed run and returns the operator types
sorted by total time, with their share of the summed operator time.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

Row = Tuple[str, float, float]  # (operator type, milliseconds per inference, share of the operator time)


def _rows(totals: Dict[str, float], runs: int, top: int) -> List[Row]:
    """Totals in ms over `runs` inferences -> the `top` rows, per inference, with shares."""
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(op, ms / runs, ms / whole) for op, ms in ranked]


def profile_onnxruntime(engine, images: np.ndarray, runs: int = 3, top: int = 10) -> List[Row]:
    """Operator types of an `OnnxRuntimeEngine`'s graph (its file and thread count)."""
    import onnxruntime as ort

    from engines.onnxruntime import session_options

    with tempfile.TemporaryDirectory(prefix="icmoe-ort-profile-") as tmp:
        so = session_options(engine.threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(engine.path), sess_options=so, providers=engine.providers)
        feed = {engine.input_name: images}
        session.run(None, feed)
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: Dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            totals[ev["args"]["op_name"]] += ev["dur"] / 1e3
    # The first run (untimed) is in the trace too: scale to `runs` inferences.
    return _rows({k: v * runs / (runs + 1) for k, v in totals.items()}, runs, top)


def profile_openvino(engine, images: np.ndarray, runs: int = 3, top: int = 10) -> List[Row]:
    """Operator types an `OpenVINOEngine`'s compiled graph executes."""
    import openvino as ov

    from engines.openvino import compile_properties

    core = ov.Core()
    compiled = core.compile_model(engine._read(core), "CPU",
                                  {**compile_properties(engine.threads, engine.hint), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    request.infer({engine.input_name: images})
    totals: Dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer({engine.input_name: images})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                totals[info.node_type] += info.real_time.total_seconds() * 1e3
    return _rows(totals, runs, top)


def profile_eager(engine, images: np.ndarray, runs: int = 3, top: int = 10) -> List[Row]:
    """Aten operators of an `EagerEngine` (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    engine.infer(images)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            engine.infer(images)
    totals = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    return _rows(totals, runs, top)


def profile_engine(engine, images: np.ndarray, runs: int = 3, top: int = 10) -> List[Row]:
    """Dispatch on the engine's runtime; the engine must be active (eager) or loaded (graph runtimes).

    Raises:
      ValueError: a runtime without a profiler here (TensorRT: use `trtexec --dumpProfile` on a GPU host).
    """
    runtime = engine.name.split("-")[0]
    fn = {"onnxruntime": profile_onnxruntime, "openvino": profile_openvino, "eager": profile_eager}.get(runtime)
    if fn is None:
        raise ValueError(f"no operator profile for {engine.name}")
    return fn(engine, images, runs, top)


def markdown(name: str, rows: List[Row]) -> str:
    lines = [f"Where {name}'s time goes (batch 1, by operator type):", "",
             "| operator | ms / inference | share |", "|---|---|---|"]
    lines += [f"| {op} | {ms:.1f} | {share:.1%} |" for op, ms, share in rows]
    return "\n".join(lines) + "\n"
