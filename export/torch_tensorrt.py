"""torch-tensorrt backend (`python -m export.build --backend torch-tensorrt`).

Compiles the build's eager model (its checkpoint, from manifest.json) with
torch-tensorrt's dynamo frontend in FP16 (torch-tensorrt's autocast, with the
voting and fusion ops kept in FP32), then saves it as TorchScript (`model.trt.ts`)
that a C++ program loads with `torch::jit::load` when it links the
torch-tensorrt runtime (libtorchtrt_runtime.so). The file is registered in
manifest.json (kind "torch_tensorrt").

Needs torch-tensorrt, TensorRT and a CUDA GPU; not run in this project's CI.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from icmoe.io import PathLike, atomic_path

TS_NAME = "model.trt.ts"
# Ops that stay FP32 under torch-tensorrt's autocast (the voting and fusion, spec section 7).
FP32_OPS = ("aten.argmin.default", "aten.gather.default", "aten.abs.default", "aten.sum.dim_IntList", "aten.gt.Scalar",
            "aten.ge.Scalar", "aten.native_layer_norm.default", "aten._softmax.default")


class TorchTensorRTError(RuntimeError):
    """torch-tensorrt is missing or failed; one line."""


def compile_and_save(
    build_dir: PathLike,
    *,
    model: Optional[Any] = None,
    batch: Tuple[int, int, int] = (1, 1, 8),
    precision: str = "fp16",
    optimization_level: int = 3,
    log: Callable[[str], None] = print,
) -> Path:
    """Compile the build's model with torch-tensorrt (FP16) and save TorchScript for C++.

    Arguments:
      build_dir: a build directory whose manifest names the checkpoint.
      model: the eager model to compile (default: load the manifest's checkpoint).
      batch: (min, opt, max) dynamic batch range.
      precision: "fp16" (autocast, voting/fusion/LayerNorm/softmax kept FP32) or "fp32".
      optimization_level: TensorRT builder optimization level.
      log: where progress lines go.

    Returns:
      Path: build_dir/model.trt.ts.

    Raises:
      TorchTensorRTError: no torch-tensorrt, no GPU, or compilation failed.
    """
    import torch

    import icmoe
    from export.manifest import add_artifact, read_manifest
    from export.onnx_export import VoteGraph
    from export.rewrite import PADDING_FREE_WINDOWS, padding_free_windows

    try:
        import torch_tensorrt
    except ImportError as e:
        raise TorchTensorRTError(f"torch-tensorrt is not installed: {e}") from None
    if not torch.cuda.is_available():
        raise TorchTensorRTError("torch-tensorrt needs a CUDA GPU (torch.cuda.is_available() is False)")
    if precision not in ("fp16", "fp32"):
        raise TorchTensorRTError(f"precision must be fp16 or fp32, got {precision!r}")
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if model is None:
        ckpt = (manifest.get("checkpoint") or {}).get("path")
        if not ckpt:
            raise TorchTensorRTError(f"{build_dir}: the manifest names no checkpoint to compile")
        ckpt_path = Path(ckpt) if Path(ckpt).is_absolute() else build_dir / ckpt
        model = icmoe.load(ckpt_path, expect=manifest["model"]["name"])
    else:
        model = copy.deepcopy(model)  # the caller's model stays where it is (CPU parity checks use it)
    model = model.eval().cuda()
    s = int(manifest["image_size"])
    bmin, bopt, bmax = batch
    example = torch.rand(max(bopt, 2), 3, s, s, device="cuda") * 255
    dim = torch.export.Dim("batch", min=bmin, max=bmax)
    fp16 = precision == "fp16"
    log(f"torch-tensorrt {torch_tensorrt.__version__}: exporting and compiling ({precision}, batch {bmin}..{bmax})")
    rewrite = PADDING_FREE_WINDOWS in manifest.get("rewrites", [])  # as the build's ONNX graph
    with torch.inference_mode(False), torch.no_grad():
        with padding_free_windows(model) if rewrite else contextlib.nullcontext():
            program = torch.export.export(VoteGraph(model), (example,), dynamic_shapes={"image": {0: dim}})
        inputs = [torch_tensorrt.Input(min_shape=(bmin, 3, s, s), opt_shape=(bopt, 3, s, s), max_shape=(bmax, 3, s, s),
                                       dtype=torch.float32, name="image")]
        try:
            trt_module = torch_tensorrt.dynamo.compile(
                program,
                arg_inputs=inputs,
                enable_autocast=fp16,
                autocast_low_precision_type=torch.float16 if fp16 else None,
                autocast_excluded_ops=[_aten(op) for op in FP32_OPS] if fp16 else [],
                min_block_size=1,
                optimization_level=optimization_level,
            )
        except Exception as e:
            raise TorchTensorRTError(f"torch-tensorrt compilation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        out = build_dir / TS_NAME
        with atomic_path(out) as tmp:
            torch_tensorrt.save(trt_module, str(tmp), output_format="torchscript", arg_inputs=[example])
    add_artifact(build_dir, TS_NAME, kind="torch_tensorrt", precision=precision, format="torchscript",
                 torch_tensorrt=torch_tensorrt.__version__, batch={"min": bmin, "opt": bopt, "max": bmax})
    log(f"wrote {out}")
    return out


def _aten(qualname: str):
    """torch.ops.aten.<op>.<overload> from "aten.op.overload"."""
    import torch

    _, op, overload = qualname.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)
