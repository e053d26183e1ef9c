"""FP16: a strongly typed mixed-precision graph made with NVIDIA ModelOpt AutoCast.

Details: docs/export.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Optional, Sequence

import onnx

from icmoe.core.errors import IcmoeError
from icmoe.core.extras import missing
from icmoe.core.io import PathLike, atomic_path
from icmoe.core.specs import TensorSpec
from icmoe.families import Family

log = logging.getLogger(__name__)

class PrecisionError(IcmoeError, RuntimeError):
    """The FP16 conversion failed or produced a graph that breaks the contract."""


def fp16_unavailable() -> Optional[str]:
    """Why the FP16 graph cannot be made here (ModelOpt AutoCast or what it imports is missing), or None."""
    try:
        import modelopt.onnx.autocast  # noqa: F401
        import polygraphy  # noqa: F401  (AutoCast's reference runner imports it only when it converts)
    except ImportError as e:
        return missing("the FP16 graph (ModelOpt AutoCast)", "fp16", e)
    return None


def convert_fp16(src: PathLike, dst: PathLike, *, family: Family, outputs: Sequence[TensorSpec],
                 inputs: Sequence[TensorSpec]) -> Path:
    """Convert an FP32 graph to the strongly typed FP16 graph, atomically.

    Arguments:
      src: the FP32 ONNX file.
      dst: the FP16 ONNX file to write.
      family: says which op types and nodes stay FP32.
      inputs, outputs: the graph's tensor specs; their element types must survive.

    Returns:
      Path: `dst`.

    Raises:
      PrecisionError: AutoCast is missing or failed, or the result breaks the I/O contract.
    """
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
        from modelopt.onnx.logging_config import configure_logging
    except ImportError as e:
        raise PrecisionError(missing("the FP16 graph (ModelOpt AutoCast)", "fp16", e)) from None
    src, dst = Path(src), Path(dst)
    try:
        island = family.precision.fp32_nodes(onnx.load(str(src), load_external_data=False))
    except IcmoeError as e:
        raise PrecisionError(f"{src}: {e}") from None
    configure_logging(logging.WARNING)  # AutoCast logs every node at INFO
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            out = convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type="fp16",
                nodes_to_exclude=island,
                op_types_to_exclude=list(family.precision.fp32_op_types),
                keep_io_types=True,
                providers=["cpu"],
            )
    except Exception as e:
        raise PrecisionError(f"AutoCast FP16 conversion failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    for line in buf.getvalue().splitlines():
        if line.strip():
            log.debug(f"  [autocast] {line.strip()}")
    merged = dedupe_initializers(out)
    if merged:
        log.info(f"fp16: merged {merged} duplicated initializers (AutoCast copies shared weights per consumer)")
    check_io_types(out, list(inputs) + list(outputs))
    onnx.checker.check_model(out)
    with atomic_path(dst) as tmp:
        onnx.save_model(out, str(tmp))
    return dst


def dedupe_initializers(proto: onnx.ModelProto) -> int:
    """Merge initializers with identical type, shape and bytes (in place); returns how many were dropped.

    AutoCast gives a weight consumed by several nodes one copy per consumer; the frozen ViT's
    weights are consumed by the trunk, the frozen tail and the adaptive path, so without this
    pass the FP16 graph would store them several times (they are meant to be stored once).
    """
    import hashlib

    g = proto.graph
    keep, rename = {}, {}
    kept = []
    for init in g.initializer:
        key = (init.data_type, tuple(init.dims), hashlib.sha256(onnx.numpy_helper.to_array(init).tobytes()).hexdigest())
        if key in keep:
            rename[init.name] = keep[key]
        else:
            keep[key] = init.name
            kept.append(init)
    if not rename:
        return 0
    outputs = {o.name for o in g.output}
    rename = {k: v for k, v in rename.items() if k not in outputs}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    dropped = [i for i in g.initializer if i.name in rename]
    for init in dropped:
        g.initializer.remove(init)
    names = {i.name for i in g.initializer}
    for vi in [v for v in g.value_info if v.name in rename and v.name not in names]:
        g.value_info.remove(vi)
    return len(dropped)


def check_io_types(proto: onnx.ModelProto, specs: Sequence[TensorSpec]) -> None:
    """The FP16 graph must keep the specs' I/O element types (e.g. float32 in; float32, uint8, int32 out)."""
    want = {s.name: onnx.helper.np_dtype_to_tensor_dtype(s.np_dtype) for s in specs}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        t = vi.type.tensor_type.elem_type
        if vi.name in want and t != want[vi.name]:
            raise PrecisionError(f"{vi.name}: element type {onnx.TensorProto.DataType.Name(t)} "
                                 f"after conversion, expected {onnx.TensorProto.DataType.Name(want[vi.name])}")


def tensor_types(proto: onnx.ModelProto) -> dict:
    """Element type of every tensor in the graph (after shape inference): name -> TensorProto type."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types
