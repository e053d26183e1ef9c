"""Build `model.plan`, the TensorRT engine of a build directory, through Polygraphy's loaders.

Details: docs/gpu.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from engines.tensorrt import tensorrt_version
from icmoe.core.errors import IcmoeError
from icmoe.core.extras import install_hint, missing
from icmoe.core.io import PathLike, atomic_path
from icmoe.core.manifest import PLAN_NAME, add_artifact, artifact_path, family_of, io_specs, read_manifest
from icmoe.families import get_family

log = logging.getLogger(__name__)
MIN_TENSORRT = (10, 9)  # strongly typed networks + AOT Quickly Deployable Plugins


class TensorRTBuildError(IcmoeError, RuntimeError):
    """The engine could not be built; one line."""


def compute_capability() -> str:
    """The current CUDA device's compute capability, e.g. "8.9"."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def timing_cache_path(cache_dir: Optional[PathLike] = None) -> Path:
    """Timing cache file for this TensorRT version and GPU: <dir>/timing-trt<version>-sm<cc>.cache."""
    import tensorrt as trt

    base = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "icmoe" / "tensorrt"
    return base / f"timing-trt{trt.__version__}-sm{compute_capability().replace('.', '')}.cache"


def _progress_monitor() -> Any:
    """A TensorRT IProgressMonitor that shows the build phases as tqdm bars."""
    import tensorrt as trt
    from tqdm import tqdm

    class TqdmProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: Dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=parent_phase is None, position=len(self.bars))

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return TqdmProgress()


@dataclass(frozen=True)
class EngineSettings:
    """TensorRT builder settings (the build's `--opt-level`, `--workspace`, ... flags).

    Attributes:
      optimization_level: builder optimization level 0..5 (TensorRT's default 3).
      version_compatible: engine runs on later TensorRT versions (lean runtime).
      hardware_compatible: engine runs on any Ampere or newer GPU.
      workspace_bytes: workspace memory-pool limit (None: TensorRT's default).
      timing_cache_dir: folder of the per-version, per-GPU timing caches.
      passes: apply the family's graph passes (IC-MoE: the PPAV plugin).
      progress: show TensorRT's build phases as progress bars.
    """

    optimization_level: int = 3
    version_compatible: bool = False
    hardware_compatible: bool = False
    workspace_bytes: Optional[int] = None
    timing_cache_dir: Optional[PathLike] = None
    passes: bool = True
    progress: bool = True


def _check_tensorrt() -> str:
    try:
        version = tensorrt_version()
    except ImportError as e:
        raise TensorRTBuildError(f"TensorRT is not available: {e} ({install_hint('tensorrt')}, on a GPU host)") from None
    if version < MIN_TENSORRT:
        raise TensorRTBuildError(f"TensorRT {version[0]}.{version[1]} is too old: need >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]}")
    try:
        import polygraphy  # noqa: F401  (the builder front end, installed with TensorRT by the same extra)
    except ImportError as e:
        raise TensorRTBuildError(missing("building a TensorRT engine", "tensorrt", e)) from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTBuildError("building a TensorRT engine needs a CUDA GPU (torch.cuda.is_available() is False)")
    return compute_capability()


def apply_passes(build_dir: Path, src: Path, manifest: Dict[str, Any], precision: str) -> Tuple[Path, list]:
    """Run the family's graph passes on `src` in order; returns the final graph and the pass names."""
    graph: Path = src
    names: List[str] = []
    for gp in get_family(family_of(manifest)).precision.tensorrt_passes:
        dst = build_dir / gp.output
        gp.apply(graph, dst, manifest)
        add_artifact(build_dir, gp.output, kind="onnx-tensorrt-pass", precision=precision, source=graph.name,
                     graph_pass=gp.name)
        if gp.prepare is not None:
            gp.prepare()
        log.info(f"graph pass {gp.name}: {graph.name} -> {gp.output}")
        graph, names = dst, names + [gp.name]
    return graph, names


def _builder_config(settings: EngineSettings, shape: Tuple[str, Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]],
                    cache: Path) -> Any:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile

    name, lo, opt, hi = shape
    return CreateConfig(
        profiles=[Profile().add(name, min=lo, opt=opt, max=hi)],
        builder_optimization_level=settings.optimization_level,
        load_timing_cache=str(cache) if cache.exists() else None,
        version_compatible=settings.version_compatible or None,
        hardware_compatibility_level=trt.HardwareCompatibilityLevel.AMPERE_PLUS if settings.hardware_compatible else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: settings.workspace_bytes} if settings.workspace_bytes else None,
        progress_monitor=_progress_monitor() if settings.progress else None,
    )


def build_engine(
    build_dir: PathLike,
    *,
    onnx_name: str = "model.fp16.onnx",
    batch: Tuple[int, int, int] = (1, 1, 8),
    settings: EngineSettings = EngineSettings(),
) -> Path:
    """Build and register `build_dir/model.plan` from one of the build's ONNX graphs.

    Arguments:
      build_dir: a build directory (manifest.json lists `onnx_name`).
      onnx_name: the graph to build from ("model.fp16.onnx" or "model.onnx").
      batch: (min, opt, max) of the optimization profile.
      settings: builder settings (optimization level, compatibility, workspace, timing cache, passes).

    Returns:
      Path: build_dir/model.plan.

    Raises:
      TensorRTBuildError: TensorRT missing or too old, no GPU, or the build failed.
      ManifestError: the build directory or the graph is missing or damaged.
    """
    cc = _check_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    src = artifact_path(build_dir, onnx_name)
    precision = manifest["artifacts"][onnx_name].get("precision", manifest["precision"])
    bmin, bopt, bmax = (int(b) for b in batch)
    if not 1 <= bmin <= bopt <= bmax:
        raise TensorRTBuildError(f"batch range must satisfy 1 <= min <= opt <= max, got {batch}")
    graph, passes = apply_passes(build_dir, src, manifest, precision) if settings.passes else (src, [])
    cache = timing_cache_path(settings.timing_cache_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    spec = io_specs(manifest)["inputs"][0]
    log.info(f"building {PLAN_NAME} from {graph.name}: TensorRT {trt.__version__}, sm {cc}, batch {bmin}/{bopt}/{bmax}, "
             f"optimization level {settings.optimization_level}, timing cache {cache}")
    config = _builder_config(settings, (spec.name, spec.concrete(bmin), spec.concrete(bopt), spec.concrete(bmax)), cache)
    try:
        serialized = EngineBytesFromNetwork(NetworkFromOnnxPath(str(graph), strongly_typed=True), config=config,
                                            save_timing_cache=str(cache))()
    except Exception as e:  # Polygraphy raises PolygraphyException with TensorRT's log above it
        raise TensorRTBuildError(f"TensorRT could not build {graph.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT returned no engine for {graph.name} (see the log above)")
    plan = build_dir / PLAN_NAME
    with atomic_path(plan) as tmp:
        tmp.write_bytes(bytes(serialized))
    add_artifact(build_dir, PLAN_NAME, kind="tensorrt", precision=precision, source=graph.name,
                 tensorrt=trt.__version__, compute_capability=cc, graph_passes=passes,
                 batch={"min": bmin, "opt": bopt, "max": bmax}, optimization_level=settings.optimization_level,
                 version_compatible=settings.version_compatible, hardware_compatible=settings.hardware_compatible)
    log.info(f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB)")
    return plan
