"""Which engine of a build to run: by default the fastest one whose parity gates passed, as the build's verify
stage recorded them in the manifest (`verify.engines.<label>`: `passed`, `timing.latency_ms`), among those
this host can run; `--backend` / `--precision` narrow the choice or name the engine. Generic: nothing here
knows a model family.

Details: docs/engines.md (Choosing the engine).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from engines import BACKENDS, load_engine
from engines.base import Engine, EngineError
from icmoe.core.errors import first_line
from icmoe.core.manifest import PLAN_NAME, read_manifest

log = logging.getLogger("engines.select")
LATENCY_RUNS = 5  # batch-1 runs whose median verify records per engine
CPU_BACKENDS = ("eager", "onnxruntime", "openvino")  # engines that take `threads`
MODES = ("latency", "throughput")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def split_label(label: str) -> Tuple[str, str]:
    """"openvino-int8-bf16" -> ("openvino", "int8-bf16"): an engine label as (backend, precision)."""
    for backend in sorted(BACKENDS, key=len, reverse=True):
        if label.startswith(backend + "-"):
            return backend, label[len(backend) + 1:]
    raise EngineError(f"engine label {label!r} names no backend of {', '.join(BACKENDS)}")


@dataclass
class Choice:
    """The engine picked and why: label (backend-precision), the figures verify recorded, and the reason."""

    label: str
    backend: str
    precision: Optional[str]
    latency_ms: Optional[float] = None
    eager_ms: Optional[float] = None
    reason: str = ""
    passed: List[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: which engine and why (for logs and reports)."""
        speed = ""
        if self.latency_ms is not None:
            speed = f", {self.latency_ms:.1f} ms at batch 1"
            if self.eager_ms:
                speed += f" ({self.eager_ms / self.latency_ms:.2f}x eager)"
        return f"engine {self.label}{speed}: {self.reason}"

    def to_dict(self) -> Dict[str, Any]:
        return {"label": self.label, "backend": self.backend, "precision": self.precision,
                "latency_ms": self.latency_ms, "eager_ms": self.eager_ms, "reason": self.reason,
                "passed": list(self.passed)}


def passed_engines(manifest: Dict[str, Any]) -> List[Tuple[str, float]]:
    """(label, batch-1 ms) of every engine whose parity gates passed at build time, fastest first."""
    engines = (manifest.get("verify") or {}).get("engines") or {}
    found = [(label, float((r.get("timing") or {}).get("latency_ms", float("inf"))))
             for label, r in engines.items() if r.get("passed")]
    return sorted(found, key=lambda item: item[1])


def _fits(label: str, backend: str, precision: Optional[str]) -> bool:
    b, p = split_label(label)
    return backend in ("auto", b) and precision in (None, p)


def engine_kwargs(backend: str, threads: Optional[int] = None, mode: str = "latency") -> Dict[str, Any]:
    """The keyword arguments of `load_engine` for a backend: CPU threads, and for throughput the streams
    (ONNX Runtime: one request per thread, at most 4 at once; OpenVINO: its THROUGHPUT hint's own count)."""
    if mode not in MODES:
        raise EngineError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    kw: Dict[str, Any] = {"threads": threads} if threads and backend in CPU_BACKENDS else {}
    if mode == "throughput" and backend == "onnxruntime":
        from engines.base import default_threads

        kw["streams"] = max(1, min(4, threads or default_threads()))
    elif mode == "throughput" and backend == "openvino":
        kw["hint"] = "throughput"
    return kw


def choose(build_dir, backend: str = "auto", precision: Optional[str] = None, *, threads: Optional[int] = None,
           mode: str = "latency") -> Tuple[Engine, Choice]:
    """The engine to run a build with, loaded (not activated), and why it was picked.

    Arguments:
      build_dir: a build directory.
      backend: a key of `engines.BACKENDS`, or "auto".
      precision: an engine precision ("fp32", "fp16", "bf16", "int8", "int8-bf16"), or None for any.
      threads: CPU threads (default: the usable cores).
      mode: "latency" (one request at a time) or "throughput" (several at once, for many pictures).

    Returns:
      (engine, Choice): the fastest engine fitting `backend`/`precision` whose parity gates passed and that
      loads here; without verify results (a build made with --no-verify) or without a passed engine that
      fits: the named backend, else TensorRT where the build has a plan this host runs, else ONNX Runtime.

    Raises:
      EngineError: the named engine cannot load here.
    """
    manifest = read_manifest(build_dir)
    ranked = passed_engines(manifest)
    eager = ((manifest.get("verify") or {}).get("eager_timing") or {}).get("latency_ms")
    labels = [label for label, _ in ranked]
    tried: List[str] = []
    for label, ms in ranked:
        if not _fits(label, backend, precision):
            continue
        b, p = split_label(label)
        try:
            engine = load_engine(build_dir, b, p, **engine_kwargs(b, threads, mode))
        except EngineError as e:  # e.g. verified on a host with BF16 or a GPU, run on one without
            tried.append(f"{label} ({first_line(e)})")
            continue
        reason = (f"the fastest of the engines whose parity gates passed ({', '.join(labels)}; timed by verify on "
                  f"{(manifest.get('verify') or {}).get('cpu', 'the build host')})")
        if tried:
            reason += f"; cannot run here: {', '.join(tried)}"
        return engine, Choice(label, b, p, ms, eager, reason, labels)
    return _fallback(build_dir, manifest, backend, precision, threads, mode, labels, tried)


def _fallback(build_dir, manifest: Dict[str, Any], backend: str, precision: Optional[str], threads: Optional[int],
              mode: str, labels: List[str], tried: List[str]) -> Tuple[Engine, Choice]:
    """No passed engine fits: the named backend, else TensorRT where a plan runs here, else ONNX Runtime."""
    if "verify" not in manifest:
        why = "the build has no verify results (built with --no-verify)"
    elif tried:
        why = f"no engine that passed its gates runs here ({', '.join(tried)})"
    else:
        why = f"no engine that passed its gates fits (passed: {', '.join(labels) or 'none'})"
    if backend == "auto" and PLAN_NAME in manifest["artifacts"]:
        try:
            engine = load_engine(build_dir, "tensorrt", precision)
            return engine, Choice(engine.name, "tensorrt", precision, reason=f"{why}; the build's TensorRT plan")
        except EngineError as e:
            why += f"; TensorRT cannot run here ({first_line(e)})"
    chosen = "onnxruntime" if backend == "auto" else backend
    engine = load_engine(build_dir, chosen, precision, **engine_kwargs(chosen, threads, mode))
    return engine, Choice(engine.name, chosen, precision, reason=f"{why}; {'named' if backend != 'auto' else 'default'} "
                                                               f"backend {chosen}", passed=labels)
