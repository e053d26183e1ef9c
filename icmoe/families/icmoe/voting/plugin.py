"""The PPAV voting kernel as a TensorRT ahead-of-time Quickly Deployable Plugin, and the graph pass that uses it.

Details: docs/gpu.md.
"""

import itertools
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from icmoe.core.errors import IcmoeError
from icmoe.core.io import PathLike, atomic_path
from icmoe.families.icmoe.voting.reference import ppav

PLUGIN_NAMESPACE = "icmoe"
PLUGIN_NAME = "ppav"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"
ONNX_DOMAIN = "trt.plugins"  # custom-op domain of the node (declared in opset_import)
PLUGIN_INPUTS = ("z0", "z1", "z2")  # basic, semantic, adaptive expert logits, FP32 (B, 1, H, W)
PLUGIN_OUTPUTS = ("logits", "mask", "expert")
PLUGIN_OUTPUT_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT32)
# The plugin's attributes, in registration order, with their ONNX attribute types.
PLUGIN_ATTRIBUTES = {"alpha": onnx.AttributeProto.FLOAT, "balance": onnx.AttributeProto.INT, "threshold": onnx.AttributeProto.INT}
# Attributes TensorRT's ONNX parser consumes itself (not passed to the plugin creator).
PARSER_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}
PLUGIN_GRAPH_NAME = "model.plugin.onnx"


class PluginGraphError(IcmoeError, RuntimeError):
    """The voting subgraph could not be found or is not PPAV; one line."""


# ---------------------------------------------------------------------------------------- TensorRT


def register_plugin() -> None:
    """Register `icmoe::ppav` with `tensorrt.plugin` (idempotent).

    Raises:
      ImportError: TensorRT (>= 10.9, with AOT plugin support) is not installed.
    """
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if not hasattr(trtp, "aot_impl"):
        raise ImportError(f"TensorRT {trt.__version__} has no AOT Quickly Deployable Plugins (need >= 10.9)")
    if hasattr(trtp.op, PLUGIN_NAMESPACE) and hasattr(getattr(trtp.op, PLUGIN_NAMESPACE), PLUGIN_NAME):
        return

    @trtp.register(PLUGIN_ID)
    def ppav_desc(
        z0: trtp.TensorDesc, z1: trtp.TensorDesc, z2: trtp.TensorDesc, alpha: float, balance: int, threshold: int
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        logits = trtp.from_shape_expr(z2.shape_expr, dtype=trt.float32)  # (B, 1, H, W)
        mask = trtp.from_shape_expr(z2.shape_expr, dtype=trt.uint8)  # (B, 1, H, W)
        expert = trtp.from_shape_expr((z2.shape_expr[0],), dtype=trt.int32)  # (B,)
        return logits, mask, expert

    @trtp.aot_impl(PLUGIN_ID)
    def ppav_aot_impl(
        z0: trtp.TensorDesc,
        z1: trtp.TensorDesc,
        z2: trtp.TensorDesc,
        alpha: float,
        balance: int,
        threshold: int,
        outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        compiled, ptx = compile_plugin_kernel(alpha=alpha, balance=bool(balance), threshold=threshold)
        shape = z0.shape_expr  # (B, 1, H, W), symbolic
        launch = trtp.KernelLaunchParams()
        launch.grid_x = 1 if balance else shape[0]  # one program per sample (one for the whole batch when balancing)
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        scalars = trtp.SymIntExprs(2)  # kernel arguments between the inputs and the outputs
        scalars[0] = trtp.SymInt32(shape[0])  # B
        scalars[1] = trtp.SymInt32(shape[2] * shape[3])  # H * W
        return compiled.metadata.name, ptx, launch, scalars


def compile_plugin_kernel(*, alpha: float, balance: bool, threshold: int, arch: Optional[int] = None) -> Tuple[Any, str]:
    """Compile the voting kernel for the plugin; returns (CompiledKernel, PTX with TensorRT's argument list).

    Arguments:
      alpha, balance, threshold: the plugin's attributes (threshold -1: ceil(B / 3)).
      arch: compute capability as an int (86, 90, ...); default: the current CUDA device's.
    """
    # export -> engines is against the layering on purpose and lazy: the kernel is one
    # piece of code shared by eager inference and the engine, and it lives in engines/.
    from icmoe.families.icmoe.voting.kernel import aot_ptx, compile_aot

    if arch is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    compiled = compile_aot(alpha=alpha, balance=balance, threshold=threshold, arch=arch)
    return compiled, aot_ptx(compiled)


# ---------------------------------------------------------------------------------------- graph pass


def _producers(graph) -> Dict[str, Any]:
    return {t.name: node for node in graph.nodes for t in node.outputs}


def find_voting_inputs(graph) -> List[Any]:
    """The three expert-logit tensors the voting subgraph starts from (unordered).

    Walks back from the graph outputs and stops at each decoder's final Resize
    (moving past a Cast to FP32 that follows it, so the plugin gets FP32 maps).
    """
    import onnx_graphsurgeon as gs

    prod = _producers(graph)
    frontier: Dict[str, Any] = {}
    seen = set()
    stack = [t for t in graph.outputs]
    while stack:
        t = stack.pop()
        node = prod.get(t.name)
        if node is None or id(node) in seen:
            continue
        if node.op == "Resize":
            frontier[t.name] = t
            continue
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            src = prod.get(node.inputs[0].name)
            if src is not None and src.op == "Resize":
                frontier[t.name] = t  # the FP32 copy of an FP16 expert map
                continue
        seen.add(id(node))
        stack.extend(i for i in node.inputs if isinstance(i, gs.Variable))
    if len(frontier) != 3:
        raise PluginGraphError(f"expected the voting to start from 3 upsampled expert maps, found {len(frontier)}")
    return list(frontier.values())


def probe_maps(image_size: int) -> List[np.ndarray]:
    """Expert logits (3 samples) on which every ordering of (z0, z1, z2) votes differently.

    Sample 0: z1 = -z0, z2 = 3 z0 (z0 and the fused map agree, so z0 wins, tie to the lowest);
    sample 1: the same with z0 and z1 swapped (z1 wins); sample 2: independent maps.
    """
    rng = np.random.default_rng(0)
    s = image_size
    r = rng.standard_normal((2, 1, s, s)).astype(np.float32)
    z = [np.empty((3, 1, s, s), np.float32) for _ in range(3)]
    z[0][0], z[1][0], z[2][0] = r[0], -r[0], 3 * r[0]
    z[0][1], z[1][1], z[2][1] = -r[1], r[1], 3 * r[1]
    for e in range(3):
        z[e][2] = rng.standard_normal((1, s, s)).astype(np.float32) * (e + 1) + rng.standard_normal()
    return z


def order_voting_inputs(model: onnx.ModelProto, names: Sequence[str], *, alpha: float) -> List[str]:
    """Order the three voting inputs as (z0, z1, z2) by running the subgraph on probe maps.

    Raises:
      PluginGraphError: no ordering reproduces icmoe.families.icmoe.voting.ppav (the tail is not PPAV).
    """
    import onnxruntime as ort
    import torch

    sub = _extract(model, list(names), list(PLUGIN_OUTPUTS))
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    size = _spatial_size(model)
    maps = probe_maps(size)
    ref = ppav(*(torch.from_numpy(m) for m in maps), alpha=alpha)
    matches = []
    for perm in itertools.permutations(range(3)):
        feed = {names[perm[e]]: maps[e] for e in range(3)}  # names[perm[e]] plays z_e
        logits, mask, expert = session.run(list(PLUGIN_OUTPUTS), feed)
        if (
            np.array_equal(expert, ref.expert.numpy())
            and np.array_equal(mask, ref.mask.numpy())
            and np.allclose(logits, ref.logits.numpy(), rtol=0, atol=1e-5)
        ):
            matches.append([names[perm[e]] for e in range(3)])
    if len(matches) != 1:
        raise PluginGraphError(
            f"the graph's voting subgraph does not reproduce icmoe.families.icmoe.voting.ppav (alpha={alpha}): "
            f"{len(matches)} of 6 input orderings match"
        )
    return matches[0]


def _spatial_size(model: onnx.ModelProto) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def _extract(model: onnx.ModelProto, inputs: List[str], outputs: List[str]) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.inputs = [tensors[n].to_variable(dtype=np.float32, shape=("batch", 1, "h", "w")) for n in inputs]
    graph.outputs = [tensors[n] for n in outputs]
    graph.cleanup(remove_unused_graph_inputs=True)
    return gs.export_onnx(graph)


def make_plugin_node_graph(model: onnx.ModelProto, *, alpha: float, balance: bool = False,
                           threshold: Optional[int] = None) -> onnx.ModelProto:
    """Return a copy of `model` with its voting subgraph replaced by one `ppav` plugin node."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    found = find_voting_inputs(graph)
    ordered = order_voting_inputs(model, [t.name for t in found], alpha=alpha)
    tensors = graph.tensors()
    inputs = [tensors[n] for n in ordered]
    outputs = [tensors[n] for n in PLUGIN_OUTPUTS]
    for t in outputs:
        t.inputs.clear()  # detach from the old voting nodes; cleanup() drops them
    attrs: Dict[str, Any] = dict(PARSER_ATTRIBUTES)
    attrs.update(alpha=float(alpha), balance=int(bool(balance)), threshold=-1 if threshold is None else int(threshold))
    graph.nodes.append(gs.Node(op=PLUGIN_NAME, name="ppav_plugin", domain=ONNX_DOMAIN, attrs=attrs,
                               inputs=inputs, outputs=outputs))
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    if not any(o.domain == ONNX_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(ONNX_DOMAIN, 1))
    out.ir_version = model.ir_version
    return out


def make_plugin_graph(src: PathLike, dst: PathLike, *, alpha: float, balance: bool = False,
                      threshold: Optional[int] = None) -> Path:
    """Write `dst`: the graph `src` with its voting replaced by the `icmoe::ppav` AOT plugin node (atomically).

    Arguments:
      src: an exported IC-MoE graph (model.fp16.onnx or model.onnx).
      dst: where to write the plugin graph.
      alpha: the model's fusion weight (from the build's config), used to verify the subgraph.
      balance, threshold: plugin attributes (inference default: no balancing).

    Returns:
      Path: dst.

    Raises:
      PluginGraphError: the voting subgraph is not found or is not PPAV; the result fails onnx.checker.
    """
    model = onnx.load(str(src))
    out = make_plugin_node_graph(model, alpha=alpha, balance=balance, threshold=threshold)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as e:
        raise PluginGraphError(f"plugin graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save_model(out, str(tmp))
    return dst


def plugin_nodes(model: onnx.ModelProto) -> List[onnx.NodeProto]:
    """The `ppav` plugin nodes of a graph."""
    return [n for n in model.graph.node if n.domain == ONNX_DOMAIN and n.op_type == PLUGIN_NAME]
