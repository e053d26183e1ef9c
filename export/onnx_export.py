"""A model of any family to ONNX: one portable FP32 graph, shared weights stored once.

The graph is the family's `export_module` traced with `torch.onnx.export(dynamo=True)`,
with the family's tensor specs as its inputs and outputs (the batch axis dynamic).
Parameters that several parts of a model reference (IC-MoE: the frozen ViT used by three
experts) are lifted once by torch.export, so they appear once in the initializers, and
constant folding is limited so that no weight gets a folded copy. Everything the model
computes, post-processing included (IC-MoE: the voting and the fusion), is standard ONNX
ops, so any ONNX runtime runs the graph. SAM's windowed attention is exported without
its padded projections (`export.rewrite`).

    python -m export.onnx_export --config vit_b     # initializer bytes vs the family's variant (IC-MoE: naive)
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import onnx
import torch
from torch import nn

from export.rewrite import padding_free_windows
from icmoe.core import cli
from icmoe.core.errors import IcmoeError
from icmoe.core.io import PathLike, atomic_path
from icmoe.families import Family, add_model_args, get_family

DEFAULT_OPSET = 18
FOLD_LIMIT = 1024  # largest tensor (elements) constant folding may consume or produce
log = logging.getLogger(__name__)


class ExportError(IcmoeError, RuntimeError):
    """The model could not be exported or the exported graph failed its checks."""


def export_onnx(
    model: nn.Module,
    path: PathLike,
    *,
    batch: Tuple[int, int, int] = (1, 1, 8),
    opset: int = DEFAULT_OPSET,
    clean: bool = True,
    rewrite: bool = True,
    family: Optional[Family] = None,
) -> Path:
    """Export a model of a registered family to a single-file ONNX graph, atomically.

    Arguments:
      model: the family's model (or one of its eager variants), on the CPU; put in eval mode.
      path: destination file (written to a temporary name, then renamed).
      batch: (min, opt, max) of the dynamic batch axis.
      opset: ONNX opset.
      clean: fold constants and drop dead nodes with onnx-graphsurgeon.
      rewrite: export windowed attention without padded projections (`export.rewrite`;
        the same function, about a quarter fewer ViT FLOPs at 256x256).
      family: the model's family (default: the one its config class names).

    Returns:
      Path: the written graph.

    Raises:
      ExportError: the exporter failed or the graph did not pass `onnx.checker`.
    """
    model = model.eval()
    family = family or get_family(type(model.config).family)
    inputs, outputs = family.graph.inputs(model.config), family.graph.outputs(model.config)
    proto = _trace(model, family, batch=batch, opset=opset, rewrite=rewrite)
    if clean:
        proto = clean_graph(proto)
    _name_io(proto, [s.name for s in inputs], [s.name for s in outputs])
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"exported graph failed onnx.checker: {str(e).splitlines()[0]}") from e
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(path)


def _trace(model: nn.Module, family: Family, *, batch: Tuple[int, int, int], opset: int,
           rewrite: bool) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of the family's export module, optimized without folding weights."""
    inputs, outputs = family.graph.inputs(model.config), family.graph.outputs(model.config)
    bmin, bopt, bmax = batch
    example = family.graph.example_inputs(model.config, max(bopt, 2))  # batch >= 2: the axis stays dynamic
    dim = torch.export.Dim("batch", min=max(1, bmin), max=max(bmax, 2))
    buf = io.StringIO()
    try:
        # The exporter prints its own progress; keep it in the log instead of the terminal.
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), _quiet_loggers(), \
                family.graph.export_patches(model), \
                (padding_free_windows(model) if rewrite else contextlib.nullcontext(0)) as swapped:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                family.graph.export_module(model),
                example,
                dynamo=True,
                opset_version=opset,
                input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs],
                dynamic_shapes={s.name: {0: dim} for s in inputs},
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
        log.info(f"  rewrite: {swapped} windowed attention blocks project real tokens only (export.rewrite)")
    for line in buf.getvalue().splitlines():
        if line.strip():
            log.debug(f"  [torch.onnx] {line.strip()}")
    return program.model_proto


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


def _name_io(proto: onnx.ModelProto, inputs: List[str], outputs: List[str]) -> None:
    """Make sure the graph's I/O carry the family's names and the batch axis is called "batch"."""
    g = proto.graph
    if [i.name for i in g.input] != inputs or [o.name for o in g.output] != outputs:
        raise ExportError(
            f"graph I/O are {[i.name for i in g.input]} -> {[o.name for o in g.output]}, expected {inputs} -> {outputs}"
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


def perturbed(model: nn.Module, scale: float = 1e-3, seed: int = 0) -> nn.Module:
    """`model` with every trainable parameter moved by seeded noise (in place; returned).

    A random-init model holds copies that training would make distinct (IC-MoE: the semantic
    tail and the three decoders); perturbing them makes equal tensors mean real sharing and
    discrete choices (IC-MoE's chosen candidate) stop being ties.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def compare_variant(family: str, config: str, variant: str, *, seed: int = 0,
                    out_dir: Optional[PathLike] = None) -> Dict[str, Any]:
    """Initializer bytes of the family's model vs one of its eager variants, same (perturbed) weights.

    Returns:
      dict: both byte counts and parameter counts, and their ratio.
    """
    import tempfile

    fam = get_family(family)
    torch.manual_seed(seed)
    model = perturbed(fam.build(fam.get_config(config)), seed=seed)
    other = fam.variant(model, variant)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        s = initializer_stats(export_onnx(model, Path(tmp) / "model.onnx"))
        n = initializer_stats(export_onnx(other, Path(tmp) / f"{variant}.onnx"))
    return {"model": family, "config": config, "variant": variant, "bytes": s["bytes"],
            f"{variant}_bytes": n["bytes"], "ratio": s["bytes"] / n["bytes"], "params": s["params"],
            f"{variant}_params": n["params"]}


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.parser("python -m export.onnx_export",
                   "Export a family's model and one of its eager variants (random init, trainable parts "
                   "perturbed) and compare the bytes of their ONNX initializers.")
    add_model_args(p)
    p.add_argument("--variant", default=None, help="the variant to compare with (default: the family's first)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    cli.add_json(p, "the comparison")
    args = p.parse_args(argv)
    cli.setup_logging(args.verbosity)
    fam = get_family(args.model)
    variant = args.variant or next(iter(fam.variants), None)
    if variant is None:
        raise ExportError(f"family {fam.name!r} has no eager variant to compare with")
    result = compare_variant(args.model, args.config, variant, seed=args.seed)
    if args.json:
        cli.write_json(result, args.json)
    else:
        print(f"{fam.title} {args.config}: initializers {result['bytes'] / 1e6:.1f} MB vs {variant} "
              f"{result[variant + '_bytes'] / 1e6:.1f} MB: {result['ratio']:.3f}x")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
