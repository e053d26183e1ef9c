"""IC-MoE to ONNX: one portable FP32 graph with the shared backbone, voting and fusion inside.

The graph is exported from the shared-backbone `ICMoE` with `torch.onnx.export(dynamo=True)`.
Because the three experts reference the same frozen ViT parameters, torch.export lifts
each of them once, so the frozen weights appear once in the initializers; the trunk runs
once (spec section 5). The voting (argmin over L1 distances to the majority mask) and the
fusion `z2 + alpha * z_chosen` are standard ONNX ops, so any ONNX runtime runs the graph.
Windowed attention is exported without its padded projections (`export.rewrite`).

    image  (B, 3, S, S) float32 RGB 0..255   -> logits (B, 1, S, S) float32
                                                mask   (B, 1, S, S) uint8
                                                expert (B,)         int32
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import onnx
import torch
from torch import nn

from export.rewrite import padding_free_windows
from icmoe.io import PathLike, atomic_path

DEFAULT_OPSET = 18
FOLD_LIMIT = 1024  # largest tensor (elements) constant folding may consume or produce
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "mask", "expert")


class ExportError(RuntimeError):
    """The model could not be exported or the exported graph failed its checks."""


class VoteGraph(nn.Module):
    """Inference wrapper: images -> (logits, mask, expert), with the voting inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vote = self.model(image)  # Vote(logits (B,1,S,S), mask (B,1,S,S) uint8, expert (B,) int32)
        return vote.logits, vote.mask, vote.expert


def export_onnx(
    model: nn.Module,
    path: PathLike,
    *,
    batch: Tuple[int, int, int] = (1, 1, 8),
    opset: int = DEFAULT_OPSET,
    clean: bool = True,
    rewrite: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Export an IC-MoE model (shared or naive) to a single-file ONNX graph, atomically.

    Arguments:
      model: `ICMoE` (or `NaiveICMoE`), on the CPU; it is put in eval mode.
      path: destination file (written to a temporary name, then renamed).
      batch: (min, opt, max) of the dynamic batch axis.
      opset: ONNX opset.
      clean: fold constants and drop dead nodes with onnx-graphsurgeon.
      rewrite: export windowed attention without padded projections (`export.rewrite`;
        the same function, about a quarter fewer ViT FLOPs at 256x256).
      log: where progress lines go.

    Returns:
      Path: the written graph.

    Raises:
      ExportError: the exporter failed or the graph did not pass `onnx.checker`.
    """
    path = Path(path)
    model = model.eval()
    s = model.config.image_size
    bmin, bopt, bmax = batch
    example = torch.rand(max(bopt, 2), 3, s, s) * 255  # batch >= 2 so the axis is not specialised to 1
    dim = torch.export.Dim("batch", min=max(1, bmin), max=max(bmax, 2))
    buf = io.StringIO()
    try:
        # The exporter prints its own progress; keep it in the log instead of the terminal.
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), _quiet_loggers(), \
                (padding_free_windows(model) if rewrite else contextlib.nullcontext(0)) as swapped:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                VoteGraph(model),
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"image": {0: dim}},
                external_data=False,
                optimize=False,  # optimized below with limits that keep shared weights shared
                verbose=False,
            )
            # Fold only small constants: folding Transpose(weight) once per consumer would store a
            # transposed copy of a frozen weight for every expert that uses it.
            import onnxscript.optimizer

            onnxscript.optimizer.optimize(program.model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    except Exception as e:  # the exporter raises many types; report one line
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if swapped:
        log(f"  rewrite: {swapped} windowed attention blocks project real tokens only (export.rewrite)")
    for line in buf.getvalue().splitlines():
        if line.strip():
            log(f"  [torch.onnx] {line.strip()}")
    proto = program.model_proto
    if clean:
        proto = clean_graph(proto)
    _name_io(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"exported graph failed onnx.checker: {str(e).splitlines()[0]}") from e
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


@contextlib.contextmanager
def _quiet_loggers():
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def _name_io(proto: onnx.ModelProto) -> None:
    """Make sure the graph's I/O carry the contract's names and the batch axis is called "batch"."""
    g = proto.graph
    if [i.name for i in g.input] != [INPUT_NAME] or [o.name for o in g.output] != list(OUTPUT_NAMES):
        raise ExportError(
            f"graph I/O are {[i.name for i in g.input]} -> {[o.name for o in g.output]}, "
            f"expected [{INPUT_NAME!r}] -> {list(OUTPUT_NAMES)}"
        )
    for vi in list(g.input) + list(g.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        if not d0.HasField("dim_value"):
            d0.dim_param = "batch"


def clean_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, drop dead nodes and sort with onnx-graphsurgeon; keeps shared initializers shared.

    Folding is limited to small tensors so that no weight gets a folded (transposed or
    cast) duplicate next to the original.
    """
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # folding runs ORT; its optimizer notes are noise here
    graph = gs.import_onnx(proto)
    with contextlib.redirect_stdout(io.StringIO()), _quiet_gs():
        graph.fold_constants(size_threshold=4 * FOLD_LIMIT).cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(proto.opset_import)
    out.producer_name, out.producer_version = proto.producer_name, proto.producer_version
    return out


@contextlib.contextmanager
def _quiet_gs():
    from onnx_graphsurgeon.logger import G_LOGGER

    old = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = old


def initializer_stats(path_or_proto) -> Dict[str, int]:
    """Count and bytes of a graph's initializers (plus large Constant nodes), for the size check.

    Arguments:
      path_or_proto: an ONNX file or ModelProto.

    Returns:
      dict: {"count", "bytes", "params"}.
    """
    proto = onnx.load(str(path_or_proto)) if not isinstance(path_or_proto, onnx.ModelProto) else path_or_proto
    import numpy as np
    from onnx import numpy_helper

    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:  # constants folded into nodes count too
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    tensors.append(a.t)
    count, nbytes, params = 0, 0, 0
    for t in tensors:
        arr = numpy_helper.to_array(t)
        count += 1
        nbytes += int(arr.nbytes)
        params += int(np.prod(arr.shape)) if arr.shape else 1
    return {"count": count, "bytes": nbytes, "params": params}


def graph_op_counts(proto: onnx.ModelProto) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def export_from_checkpoint(checkpoint: Optional[PathLike], path: PathLike, **kw) -> Path:
    """Load a checkpoint folder with `icmoe.load` and export it (see `export_onnx`)."""
    import icmoe

    model = icmoe.load(checkpoint)
    return export_onnx(model, path, **kw)


def compare_naive(config: str = "vit_b", *, seed: int = 0, out_dir: Optional[PathLike] = None,
                  log: Callable[[str], None] = print) -> Dict[str, float]:
    """Export the shared graph and the naive three-expert graph of the same weights; compare initializers.

    The weights are random (seeded) but made distinct per expert first (the semantic tail and the
    decoders are perturbed), so equal tensors can only come from real sharing, as in a trained model.

    Returns:
      dict: shared and naive initializer bytes and their ratio.
    """
    import tempfile

    import icmoe

    torch.manual_seed(seed)
    model = icmoe.build_icmoe(config)
    with torch.no_grad():  # trained models differ from the frozen ViT where they are trainable
        for p in list(model.encoder.semantic_tail.parameters()) + list(model.decoders.parameters()):
            p.add_(torch.randn_like(p) * 1e-3)
    naive = icmoe.NaiveICMoE.from_shared(model)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        shared_path = export_onnx(model, Path(tmp) / "shared.onnx", log=log)
        naive_path = export_onnx(naive, Path(tmp) / "naive.onnx", log=log)
        s, n = initializer_stats(shared_path), initializer_stats(naive_path)
    return {"config": config, "shared_bytes": s["bytes"], "naive_bytes": n["bytes"], "ratio": s["bytes"] / n["bytes"],
            "shared_params": s["params"], "naive_params": n["params"]}


if __name__ == "__main__":  # python -m export.onnx_export [CONFIG]: the initializer size check
    import json
    import sys

    print(json.dumps(compare_naive(sys.argv[1] if len(sys.argv) > 1 else "vit_b", log=lambda m: None), indent=2))
