"""OpenVINO engine for a build's FP32 ONNX graph and its NNCF INT8 IR (any model family), on the CPU, with
FP32 or (where the CPU has BF16 arithmetic) BF16 for the floating-point operations, for latency (one
request, every thread) or throughput (several streams, one request each).

Details: docs/int8-openvino.md.
"""

from __future__ import annotations

import functools
import io
import logging
import platform
import queue
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from engines.base import BuildInfo, Engine, EngineError, default_threads
from icmoe.core import cli
from icmoe.core.extras import missing
from icmoe.core.io import atomic_write_bytes
from icmoe.core.manifest import (
    BF16_VARIANTS,
    OPENVINO_CACHE,
    OPENVINO_GRAPHS,
    add_artifact,
    graph_precision,
    read_manifest,
)

log = logging.getLogger(__name__)
HINTS = ("latency", "throughput")
# What the engine computes in: the graph's own (FP32 graph, INT8 IR with FP32 for the rest), or BF16 for the
# floating-point operations of either graph (INFERENCE_PRECISION_HINT bf16).
PRECISIONS = tuple(OPENVINO_GRAPHS) + tuple(BF16_VARIANTS)
CACHE_KIND = "openvino_cache"
# CPU flags that decide which kernels OpenVINO compiles (x86 vector and matrix extensions).
ISA_FLAG = re.compile(r"^(sse4_[12]|avx\w*|amx\w*|fma|f16c)$")


def unavailable_reason() -> Optional[str]:
    """Why OpenVINO engines cannot run here (the package does not import), or None."""
    try:
        import openvino  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return missing("the OpenVINO engine", "openvino", e)
    return None


def _openvino():
    why = unavailable_reason()
    if why:
        raise EngineError(why)
    import openvino

    return openvino


def openvino_version() -> str:
    """The installed OpenVINO's version, e.g. "2026.4.1-22982-...". """
    return str(_openvino().get_version())


def cpu_signature() -> Dict[str, str]:
    """What a compiled model depends on: the CPU's name and its vector extensions (sorted, space-joined)."""
    core = _openvino().Core()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if ISA_FLAG.match(f)))
                break
    except OSError:  # not Linux: the processor string stands for the extensions
        flags = platform.processor()
    return {"name": str(core.get_property("CPU", "FULL_DEVICE_NAME")), "isa": flags}


@functools.lru_cache(maxsize=None)
def bf16_unavailable() -> Optional[str]:
    """Why OpenVINO cannot compute in BF16 on this CPU (its CPU plugin does not list BF16: no AVX512-BF16 or
    AMX), or None."""
    core = _openvino().Core()
    caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    if "BF16" in caps:
        return None
    return (f"BF16 needs a CPU with AVX512-BF16 or AMX; OpenVINO's CPU plugin lists only {', '.join(caps)} "
            f"on this {core.get_property('CPU', 'FULL_DEVICE_NAME')}")


def inference_precision(precision: str) -> str:
    """INFERENCE_PRECISION_HINT of an engine precision: "bf16" for the BF16 variants, else "f32"."""
    return "bf16" if precision in BF16_VARIANTS else "f32"


def compile_properties(threads: int, hint: str, precision: str = "fp32", streams: Optional[int] = None) -> Dict[str, Any]:
    """The CPU plugin's properties for a compile or import (see the module docstring); `streams` (throughput
    hint only): NUM_STREAMS, None for the plugin's choice."""
    props: Dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": hint.upper(),
                             "INFERENCE_PRECISION_HINT": inference_precision(precision)}
    if hint == "throughput" and streams:
        props["NUM_STREAMS"] = int(streams)
    return props


def _reason(e: Exception) -> str:
    """OpenVINO's message in one line: its last line that is not a source location."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[-1][:300] if lines else type(e).__name__


class OpenVINOEngine(Engine):
    """A build's FP32 ONNX graph or INT8 IR, compiled by OpenVINO for the CPU.

    Arguments (keyword-only):
      path: the graph (model.onnx or model.int8.xml).
      inputs, outputs: the graph's tensor specs (from the manifest).
      batch_range: (min, max) batch the build allows.
      precision: one of `PRECISIONS`: "fp32" or "int8" (the graph decides), "bf16" or "int8-bf16" (that
        graph with BF16 for its floating-point operations; refused where the CPU has no BF16).
      cache: a checked compiled-model blob to import instead of compiling, or None.
      threads: INFERENCE_NUM_THREADS, over all streams (default: the usable cores).
      hint: "latency" (one request) or "throughput" (PERFORMANCE_HINT; several streams, one request each,
        `infer` may be called from that many threads at once).
      streams: with the throughput hint, NUM_STREAMS (None: OpenVINO's choice for this CPU).
    """

    def __init__(self, *, path, inputs, outputs, batch_range=None, precision: str = "fp32",
                 cache: Optional[Path] = None, threads: Optional[int] = None, hint: str = "latency",
                 streams: Optional[int] = None) -> None:
        super().__init__(inputs=inputs, outputs=outputs, batch_range=batch_range)
        if hint not in HINTS:
            raise EngineError(f"hint must be one of {', '.join(HINTS)}, got {hint!r}")
        if precision not in PRECISIONS:
            raise EngineError(f"OpenVINO computes in {', '.join(PRECISIONS)}, not {precision!r}")
        if precision in BF16_VARIANTS and bf16_unavailable():
            raise EngineError(f"--precision {precision}: {bf16_unavailable()}")
        self.path = Path(path)
        self.precision = precision
        self.cache = cache
        self.threads = threads or default_threads()
        self.hint = hint
        self.requested_streams = streams
        self.name = f"openvino-{precision}"
        self.compiled = None
        self.requests: "queue.Queue[Any]" = queue.Queue()
        self.n_requests = 1
        self.from_cache = False

    @classmethod
    def from_build(cls, build_dir, *, precision: Optional[str] = None, expect=None, verify: bool = True,
                   use_cache: bool = True, **kw) -> "OpenVINOEngine":
        """The graph of `precision` from a build directory (and its compiled cache), checked against the manifest.

        Arguments:
          build_dir: a build directory.
          precision: "fp32" (model.onnx) or "int8" (model.int8.xml), or "bf16" / "int8-bf16" (those graphs
            with BF16 for the floating-point operations); None: the build's precision (fp32 for an FP16
            build: its FP16 graph is for TensorRT).
          expect: what the build must be for (see `icmoe.families.check_expected`).
          verify: compare the artifacts' sizes and sha256 with the manifest.
          use_cache: import the registered compiled model where it is for this OpenVINO and CPU.
          kw: `threads`, `hint`, `streams`.

        Returns:
          OpenVINOEngine: not yet compiled (`activate`).

        Raises:
          EngineError: OpenVINO missing, no manifest, a graph or cache missing, truncated, damaged or of another
            precision, a cache made from another graph, or the build is for another model.
        """
        _openvino()
        info = BuildInfo(build_dir, expect=expect)
        if precision is None:  # the build's own, except FP16 (a GPU graph): then the FP32 graph every build has
            precision = info.manifest["precision"] if info.manifest["precision"] in OPENVINO_GRAPHS else "fp32"
        if precision not in PRECISIONS:
            raise EngineError(f"OpenVINO runs the {' and '.join(OPENVINO_GRAPHS)} graphs (also with BF16: "
                              f"{', '.join(BF16_VARIANTS)}), not {precision!r} (the FP16 graph is for TensorRT)")
        graph = graph_precision(precision)
        name = OPENVINO_GRAPHS[graph]
        entry = info.manifest["artifacts"].get(name)
        if entry is None:
            raise EngineError(f"{build_dir}: no {graph} graph for OpenVINO in this build ({name}; "
                              f"build with --precision {graph})")
        if entry.get("precision") != graph:
            raise EngineError(f"{build_dir}/{name}: manifest says precision {entry.get('precision')!r}, not {graph!r}")
        path = info.artifact(name, verify=verify)
        for extra in entry.get("files", []):  # the IR's weights
            info.artifact(extra, verify=verify)
        cache = _usable_cache(info, precision, entry, verify) if use_cache else None
        return cls(path=path, precision=precision, cache=cache, **info.specs(), **kw)

    @property
    def streams(self) -> int:
        """Requests that run at once (1 with the latency hint)."""
        return self.n_requests

    def _activate(self) -> None:
        ov = _openvino()
        core = ov.Core()
        props = compile_properties(self.threads, self.hint, self.precision, self.requested_streams)
        if self.cache is not None:
            try:
                self.compiled = core.import_model(io.BytesIO(self.cache.read_bytes()), "CPU", props)
            except Exception as e:  # OpenVINO raises RuntimeError with its source locations
                raise EngineError(f"{self.cache}: OpenVINO cannot import this compiled model ({_reason(e)})") from None
            self.from_cache = True
        else:
            model = self._read(core)
            try:
                self.compiled = core.compile_model(model, "CPU", props)
            except Exception as e:
                raise EngineError(f"{self.path}: OpenVINO cannot compile it ({_reason(e)})") from None
        self._check_compiled()
        n = 1
        if self.hint == "throughput":
            n = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.requests = queue.Queue()
        for _ in range(n):
            self.requests.put(self.compiled.create_infer_request())
        self.n_requests = n

    def _read(self, core):
        """The graph as an OpenVINO model with the build's batch range, its I/O checked."""
        ov = _openvino()
        try:
            model = core.read_model(str(self.path))
        except Exception as e:
            raise EngineError(f"{self.path}: OpenVINO cannot read it ({_reason(e)})") from None
        self._check_names(model.inputs, model.outputs, self.path)
        lo, hi = self.batch_range or (1, -1)
        shape = ov.PartialShape([ov.Dimension(lo, hi), *self.inputs[0].shape[1:]])
        try:
            model.reshape({model.inputs[0]: shape})
        except Exception as e:
            raise EngineError(f"{self.path}: cannot take input shape {shape} ({_reason(e)})") from None
        return model

    def _check_names(self, inputs: Sequence[Any], outputs: Sequence[Any], where: Path) -> None:
        """Each manifest input and output must be one of the graph's ports (a port may carry several names)."""
        def named(ports: Sequence[Any], specs: Sequence[Any]) -> bool:
            return len(ports) == len(specs) and all(any(s.name in p.get_names() for p in ports) for s in specs)

        if not (named(inputs, self.inputs) and named(outputs, self.outputs)):
            have = [sorted(p.get_names()) for p in inputs], [sorted(p.get_names()) for p in outputs]
            raise EngineError(f"{where}: graph I/O {have[0]} -> {have[1]} differs from the manifest's "
                              f"{[s.name for s in self.inputs]} -> {self.output_names}")

    def _check_compiled(self) -> None:
        """The compiled model's I/O names, input shape and output element types must be the manifest's."""
        c, where = self.compiled, self.cache or self.path
        self._check_names(c.inputs, c.outputs, where)
        shape = c.inputs[0].get_partial_shape()
        lo, hi = self.batch_range or (1, -1)
        want = [str(_openvino().Dimension(lo, hi)), *(str(d) for d in self.inputs[0].shape[1:])]  # 1..4, or 1
        if [str(d) for d in shape] != want:
            raise EngineError(f"{where}: compiled input shape {shape} is not the build's [{', '.join(want)}]")
        for spec in self.outputs:
            have = c.output(spec.name).get_element_type().to_dtype()
            if have != spec.np_dtype:
                raise EngineError(f"{where}: output {spec.name} is {have}, the manifest says {spec.dtype}")

    def _deactivate(self) -> None:
        self.requests = queue.Queue()
        self.compiled = None

    def _infer(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        request = self.requests.get()  # a free request (throughput: one per stream, threads share them)
        try:
            result = request.infer({0: images})
            # The request reuses its output buffers on the next call: copy them out.
            return {name: np.array(result[self.compiled.output(name)], copy=True) for name in self.output_names}
        finally:
            self.requests.put(request)

    def settings(self) -> Dict[str, Any]:
        """How the compiled model runs: hint, streams, threads, inference precision (OpenVINO's own figures)."""
        out: Dict[str, Any] = {"hint": self.hint, "threads": self.threads, "precision": self.precision}
        if self.compiled is not None:
            for key in ("NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT",
                        "OPTIMAL_NUMBER_OF_INFER_REQUESTS"):
                try:
                    out[key.lower()] = str(self.compiled.get_property(key))
                except Exception:  # a property this OpenVINO does not report
                    pass
        return out


def _usable_cache(info: BuildInfo, precision: str, graph: Dict[str, Any], verify: bool) -> Optional[Path]:
    """The registered compiled model of `precision` if this host can import it; None to compile from the graph.

    Raises:
      EngineError: the cache is damaged, truncated, of another kind or precision, or made from another graph.
    """
    name = OPENVINO_CACHE.format(precision=precision)
    if name not in info.manifest["artifacts"]:
        return None
    path, entry, _, _ = info.compiled(name, kind=CACHE_KIND, precision=graph_precision(precision), verify=verify)
    if entry.get("inference_precision", "f32") != inference_precision(precision):
        raise EngineError(f"{path}: compiled for inference precision {entry.get('inference_precision')}, "
                          f"not {inference_precision(precision)}")
    if entry.get("source_sha256") != graph.get("sha256"):
        raise EngineError(f"{path}: compiled from another graph than the manifest's {entry.get('source')} "
                          f"(sha256 differs)")
    stale = cache_mismatch(entry, info.manifest["batch"])
    if stale:
        log.info(f"openvino: {path.name} is for {stale}; compiling from {entry.get('source')} "
                 f"(python -m engines.openvino {info.build_dir} writes one for this host)")
        return None
    return path


def cache_mismatch(entry: Dict[str, Any], batch: Dict[str, int]) -> Optional[str]:
    """What a cache entry was compiled for that differs from this host and build, or None if it fits."""
    if entry.get("openvino") != openvino_version():
        return f"OpenVINO {entry.get('openvino')}, not {openvino_version()}"
    cpu = cpu_signature()
    if entry.get("cpu") != cpu:
        return f"CPU {(entry.get('cpu') or {}).get('name')!r} with other extensions than this {cpu['name']!r}"
    if entry.get("batch") != {"min": batch["min"], "max": batch["max"]}:
        return f"batch {entry.get('batch')}, not the build's {batch['min']}..{batch['max']}"
    return None


def write_cache(build_dir, precision: str) -> Path:
    """Compile a build's graph of `precision` for this host and register the compiled model in its manifest.

    Arguments:
      build_dir: a build directory with the graph (`OPENVINO_GRAPHS[graph_precision(precision)]`).
      precision: one of `PRECISIONS`.

    Returns:
      Path: build_dir/openvino-<precision>.blob (written atomically).

    Raises:
      EngineError: OpenVINO missing, or the graph missing, damaged or not loadable.
    """
    build_dir = Path(build_dir)
    engine = OpenVINOEngine.from_build(build_dir, precision=precision, use_cache=False, threads=1)
    engine.activate()
    buf = engine.compiled.export_model()
    blob = buf.getvalue() if hasattr(buf, "getvalue") else bytes(buf)
    engine.deactivate()
    name = OPENVINO_CACHE.format(precision=precision)
    atomic_write_bytes(build_dir / name, blob)
    manifest = read_manifest(build_dir)
    graph = OPENVINO_GRAPHS[graph_precision(precision)]
    b = manifest["batch"]
    add_artifact(build_dir, name, kind=CACHE_KIND, precision=graph_precision(precision), source=graph,
                 source_sha256=manifest["artifacts"][graph]["sha256"], openvino=openvino_version(), cpu=cpu_signature(),
                 batch={"min": b["min"], "max": b["max"]}, inference_precision=inference_precision(precision))
    log.info(f"openvino: {name} ({len(blob) / 2**20:.1f} MiB) compiled from {graph}")
    return build_dir / name


def cache_precisions(manifest: Dict[str, Any]) -> List[str]:
    """The engine precisions OpenVINO runs from a build's graphs on this CPU: fp32 always, int8 where the build
    has the IR, and their BF16 variants where the CPU has BF16."""
    graphs = [p for p, name in OPENVINO_GRAPHS.items() if name in manifest["artifacts"]]
    bf16 = [p for p, g in BF16_VARIANTS.items() if g in graphs] if not bf16_unavailable() else []
    return graphs + bf16


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser("python -m engines.openvino", "Compile a build's OpenVINO caches for this host (OpenVINO version, CPU).")
    p.add_argument("build_dir", type=Path, help="build directory written by `python -m export.build`")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="one engine precision (default: every one OpenVINO can run from the build on this CPU)")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    manifest = read_manifest(args.build_dir)
    for precision in [args.precision] if args.precision else cache_precisions(manifest):
        print(f"openvino: {write_cache(args.build_dir, precision)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
