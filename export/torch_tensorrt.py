"""torch-tensorrt backend (`python -m export.build --backend torch-tensorrt`).

Compiles the build's eager model (its checkpoint, from manifest.json) with
torch-tensorrt's dynamo frontend (FP16 through torch-tensorrt's autocast, with the
family's `fp32_aten_ops` kept in FP32, e.g. IC-MoE's voting and fusion), then saves it
as TorchScript (`model.trt.ts`) that `engines.torch_tensorrt.TorchTensorRTEngine` runs
and `export.verify` checks, and that a C++ program loads with `torch::jit::load` when it
links the torch-tensorrt runtime (libtorchtrt_runtime.so). The file is registered in
manifest.json (kind "torch_tensorrt").

Needs torch-tensorrt, TensorRT and a CUDA GPU; not run in this project's CI.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Optional, Tuple

from export.rewrite import PADDING_FREE_WINDOWS, padding_free_windows
from icmoe.checkpoint import load
from icmoe.core.errors import IcmoeError
from icmoe.core.extras import missing
from icmoe.core.io import PathLike, atomic_path
from icmoe.core.manifest import TORCH_TENSORRT_NAME, add_artifact, checkpoint_path, io_specs, model_label, read_manifest
from icmoe.families import get_family

log = logging.getLogger(__name__)


class TorchTensorRTError(IcmoeError, RuntimeError):
    """torch-tensorrt is missing or failed; one line."""


def _model_of(build_dir: Path, manifest: dict, model: Optional[Any]) -> Any:
    if model is not None:
        return copy.deepcopy(model)  # the caller's model stays where it is (CPU parity checks use it)
    path = checkpoint_path(build_dir, manifest)
    if path is None:
        raise TorchTensorRTError(f"{build_dir}: the manifest names no checkpoint to compile")
    return load(path, expect=model_label(manifest))


def compile_and_save(
    build_dir: PathLike,
    *,
    model: Optional[Any] = None,
    batch: Tuple[int, int, int] = (1, 1, 8),
    precision: str = "fp16",
    optimization_level: int = 3,
) -> Path:
    """Compile the build's model with torch-tensorrt and save TorchScript for C++.

    Arguments:
      build_dir: a build directory whose manifest names the checkpoint.
      model: the eager model to compile (default: load the manifest's checkpoint).
      batch: (min, opt, max) dynamic batch range.
      precision: "fp16" (autocast, the family's FP32 ops kept FP32) or "fp32".
      optimization_level: TensorRT builder optimization level.

    Returns:
      Path: build_dir/model.trt.ts.

    Raises:
      TorchTensorRTError: no torch-tensorrt, no GPU, or compilation failed.
    """
    import torch

    torch_tensorrt = _import_torch_tensorrt()
    if precision not in ("fp16", "fp32"):
        raise TorchTensorRTError(f"precision must be fp16 or fp32, got {precision!r}")
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    family = get_family(manifest["model"]["family"])
    module = family.graph.export_module(_model_of(build_dir, manifest, model).eval().cuda())
    spec = io_specs(manifest)["inputs"][0]
    bmin, bopt, bmax = batch
    example = torch.rand(spec.concrete(max(bopt, 2)), device="cuda") * 255
    fp16 = precision == "fp16"
    log.info(f"torch-tensorrt {torch_tensorrt.__version__}: exporting and compiling ({precision}, batch {bmin}..{bmax})")
    rewrite = PADDING_FREE_WINDOWS in manifest.get("rewrites", [])  # as the build's ONNX graph
    with torch.inference_mode(False), torch.no_grad():
        with padding_free_windows(module) if rewrite else contextlib.nullcontext():
            dim = torch.export.Dim("batch", min=bmin, max=bmax)
            program = torch.export.export(module, (example,), dynamic_shapes={spec.name: {0: dim}})
        inputs = [torch_tensorrt.Input(min_shape=spec.concrete(bmin), opt_shape=spec.concrete(bopt),
                                       max_shape=spec.concrete(bmax), dtype=torch.float32, name=spec.name)]
        try:
            trt_module = torch_tensorrt.dynamo.compile(
                program,
                arg_inputs=inputs,
                enable_autocast=fp16,
                autocast_low_precision_type=torch.float16 if fp16 else None,
                autocast_excluded_ops=[_aten(op) for op in family.precision.fp32_aten_ops] if fp16 else [],
                min_block_size=1,
                optimization_level=optimization_level,
            )
        except Exception as e:
            raise TorchTensorRTError(f"torch-tensorrt compilation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        out = build_dir / TORCH_TENSORRT_NAME
        with atomic_path(out) as tmp:
            torch_tensorrt.save(trt_module, str(tmp), output_format="torchscript", arg_inputs=[example])
    add_artifact(build_dir, TORCH_TENSORRT_NAME, kind="torch_tensorrt", precision=precision, format="torchscript",
                 torch_tensorrt=torch_tensorrt.__version__, batch={"min": bmin, "opt": bopt, "max": bmax})
    log.info(f"wrote {out}")
    return out


def _import_torch_tensorrt() -> Any:
    """torch_tensorrt, where it and a CUDA GPU exist."""
    import torch

    try:
        import torch_tensorrt
    except ImportError as e:
        raise TorchTensorRTError(missing("compiling with torch-tensorrt", "tensorrt", e)) from None
    if not torch.cuda.is_available():
        raise TorchTensorRTError("torch-tensorrt needs a CUDA GPU (torch.cuda.is_available() is False)")
    return torch_tensorrt


def _aten(qualname: str):
    """torch.ops.aten.<op>.<overload> from "aten.op.overload"."""
    import torch

    _, op, overload = qualname.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)
