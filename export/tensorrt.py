"""Build `model.plan`, the TensorRT engine of a build directory, through Polygraphy's loaders.

    from export.tensorrt import build_engine
    build_engine(Path("build/tiny-fp16"), onnx_name="model.fp16.onnx", batch=(1, 1, 8))

What the build does:
- Strongly typed network (`NetworkFromOnnxPath(..., strongly_typed=True)`): the
  precision comes from the graph itself (FP16 experts, FP32 LayerNorm/softmax/
  voting), as TensorRT 11 requires (no --fp16 flag, spec section 7).
- The voting subgraph is replaced by the `icmoe::ppav` AOT plugin first
  (`export.plugin`), unless `plugin=False`.
- One optimization profile for the input `image` from the build's batch range.
- Builder optimization level (default 3, TensorRT's default).
- A timing cache per TensorRT version and GPU compute capability, loaded before
  and saved after each build (default folder ~/.cache/icmoe/tensorrt/).
- Optional version-compatible and hardware-compatible (Ampere+) engines.
- `model.plan` is written atomically and registered in manifest.json with the
  TensorRT version, compute capability and build settings the engine loader checks.

Needs TensorRT (>= 10.9) and a CUDA GPU; written against TensorRT's and
Polygraphy's APIs and type-checked with tensorrt-stubs, but not run in this
project's CI (no GPU there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from icmoe.io import PathLike, atomic_path

PLAN_NAME = "model.plan"
MIN_TENSORRT = (10, 9)  # strongly typed networks + AOT Quickly Deployable Plugins


class TensorRTBuildError(RuntimeError):
    """The engine could not be built; one line."""


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
        return f"TensorRT not importable ({type(e).__name__}: {e})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


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


def build_engine(
    build_dir: PathLike,
    *,
    onnx_name: str = "model.fp16.onnx",
    batch: Tuple[int, int, int] = (1, 1, 8),
    log: Callable[[str], None] = print,
    plugin: bool = True,
    optimization_level: int = 3,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
    workspace_bytes: Optional[int] = None,
    timing_cache_dir: Optional[PathLike] = None,
    progress: bool = True,
) -> Path:
    """Build and register `build_dir/model.plan` from one of the build's ONNX graphs.

    Arguments:
      build_dir: a build directory (manifest.json lists `onnx_name`).
      onnx_name: the graph to build from ("model.fp16.onnx" or "model.onnx").
      batch: (min, opt, max) of the optimization profile.
      log: where progress lines go.
      plugin: replace the voting subgraph with the `icmoe::ppav` AOT plugin.
      optimization_level: builder optimization level 0..5.
      version_compatible: engine runs on later TensorRT versions (lean runtime).
      hardware_compatible: engine runs on any Ampere or newer GPU.
      workspace_bytes: workspace memory-pool limit (None: TensorRT's default).
      timing_cache_dir: folder of the per-version, per-GPU timing caches.
      progress: show TensorRT's build phases as progress bars.

    Returns:
      Path: build_dir/model.plan.

    Raises:
      TensorRTBuildError: TensorRT missing or too old, no GPU, or the build failed.
      ManifestError: the build directory or the graph is missing or damaged.
    """
    from export.manifest import add_artifact, artifact_path, read_manifest

    try:
        version = tensorrt_version()
    except ImportError as e:
        raise TensorRTBuildError(f"TensorRT is not available: {e}") from None
    if version < MIN_TENSORRT:
        raise TensorRTBuildError(f"TensorRT {version[0]}.{version[1]} is too old: need >= {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]}")
    import torch

    if not torch.cuda.is_available():
        raise TensorRTBuildError("building a TensorRT engine needs a CUDA GPU (torch.cuda.is_available() is False)")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    src = artifact_path(build_dir, onnx_name)
    precision = manifest["artifacts"][onnx_name].get("precision", manifest["precision"])
    s = int(manifest["image_size"])
    bmin, bopt, bmax = (int(b) for b in batch)
    if not 1 <= bmin <= bopt <= bmax:
        raise TensorRTBuildError(f"batch range must satisfy 1 <= min <= opt <= max, got {batch}")

    graph = src
    if plugin:
        from export.plugin import PLUGIN_GRAPH_NAME, make_plugin_graph, register_plugin

        alpha = float(manifest["model"]["config"]["alpha"])
        graph = make_plugin_graph(src, build_dir / PLUGIN_GRAPH_NAME, alpha=alpha)
        add_artifact(build_dir, PLUGIN_GRAPH_NAME, kind="onnx-tensorrt-plugin", precision=precision, source=onnx_name)
        register_plugin()
        log(f"voting subgraph replaced by the {PLUGIN_GRAPH_NAME} AOT plugin node (icmoe::ppav)")

    cache = timing_cache_path(timing_cache_dir)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cc = compute_capability()
    log(f"building {PLAN_NAME} from {graph.name}: TensorRT {trt.__version__}, sm {cc}, batch {bmin}/{bopt}/{bmax}, "
        f"optimization level {optimization_level}, timing cache {cache}")
    profile = Profile().add("image", min=(bmin, 3, s, s), opt=(bopt, 3, s, s), max=(bmax, 3, s, s))
    config = CreateConfig(
        profiles=[profile],
        builder_optimization_level=optimization_level,
        load_timing_cache=str(cache) if cache.exists() else None,
        version_compatible=version_compatible or None,
        hardware_compatibility_level=trt.HardwareCompatibilityLevel.AMPERE_PLUS if hardware_compatible else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None,
        progress_monitor=_progress_monitor() if progress else None,
    )
    network = NetworkFromOnnxPath(str(graph), strongly_typed=True)
    try:
        serialized = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(cache))()
    except Exception as e:  # Polygraphy raises PolygraphyException with TensorRT's log above it
        raise TensorRTBuildError(f"TensorRT could not build {graph.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT returned no engine for {graph.name} (see the log above)")
    plan = build_dir / PLAN_NAME
    with atomic_path(plan) as tmp:
        tmp.write_bytes(bytes(serialized))
    add_artifact(
        build_dir,
        PLAN_NAME,
        kind="tensorrt",
        precision=precision,
        source=graph.name,
        tensorrt=trt.__version__,
        compute_capability=cc,
        plugin=plugin,
        batch={"min": bmin, "opt": bopt, "max": bmax},
        optimization_level=optimization_level,
        version_compatible=version_compatible,
        hardware_compatible=hardware_compatible,
    )
    log(f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB)")
    return plan
