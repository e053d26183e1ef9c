"""INT8: post-training quantization of a build's FP32 graph, calibrated on real or synthetic images.

Details: docs/int8-openvino.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from export.precision import check_io_types
from icmoe.core.errors import IcmoeError
from icmoe.core.extras import missing
from icmoe.core.io import PathLike, atomic_path
from icmoe.core.manifest import ONNX_GRAPHS, OPENVINO_GRAPHS, add_artifact, read_manifest, write_manifest
from icmoe.families import Family

log = logging.getLogger(__name__)
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# Ops of a constant weight chain that are folded before quantization (they only move or select values).
FOLDABLE = ("Transpose", "Squeeze", "Unsqueeze", "Slice", "Reshape", "Identity")
CALIBRATION_BATCH = 4  # images per calibration run of ONNX Runtime (its memory holds one run)


class QuantizeError(IcmoeError, RuntimeError):
    """The INT8 quantization failed or produced a graph that breaks the contract; one line."""


def int8_unavailable() -> Optional[str]:
    """Why the INT8 graphs cannot be made here (NNCF or OpenVINO missing), or None."""
    for module in ("openvino", "nncf"):
        try:
            __import__(module)
        except ImportError as e:
            return missing("the INT8 build (NNCF and OpenVINO)", "openvino", e)
    return None


ISLAND = "the family's FP32 island"
PRODUCT = "product of two activations"
WHY = {
    "op types": "wide dynamic ranges and normalisations (LayerNorm, softmax, their reductions) that 8 bits flatten",
    "island": "the family's discrete decisions and what feeds them: one flipped choice changes a whole output",
    "activation products": "attention scores and softmax-weighted sums: quantized unless the family's INT8 gates "
                           "then fail (per-tensor INT8 of probabilities and of query/key ranges costs the most "
                           "accuracy); `attention_products` says per graph",
}


def activation_products(proto: onnx.ModelProto) -> List[str]:
    """MatMul nodes neither of whose inputs is a weight (an initializer, possibly behind a `FOLDABLE` chain)."""
    g = proto.graph
    inits = {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def constant(name: str) -> bool:
        while name not in inits:
            node = producer.get(name)
            if node is None or node.op_type not in FOLDABLE + ("Constant",):
                return False
            if node.op_type == "Constant":
                return True
            name = node.input[0]
        return True

    return [n.name for n in g.node if n.op_type == "MatMul" and not any(constant(i) for i in n.input[:2])]


def kept_fp32(proto: onnx.ModelProto, family: Family) -> Dict[str, str]:
    """The FP32 graph's nodes that stay in floating point, with the reason: name -> why.

    Arguments:
      proto: the FP32 graph.
      family: names the op types (`fp32_op_types`) and the island (`fp32_nodes`).

    Returns:
      dict: node name -> "op type X", the island (`ISLAND`) or a product of two activations (`PRODUCT`).
    """
    why = {n.name: f"op type {n.op_type}" for n in proto.graph.node if n.op_type in family.precision.fp32_op_types}
    for name in family.precision.fp32_nodes(proto):
        why.setdefault(name, ISLAND)
    for name in activation_products(proto):
        why.setdefault(name, PRODUCT)
    return why


def kept_summary(proto: onnx.ModelProto, family: Family, kept: Dict[str, str]) -> Dict[str, Any]:
    """What the manifest records about the kept nodes: the op types, the island's nodes, counts, and why."""
    return {
        "op_types": list(family.precision.fp32_op_types),
        "island": sorted(n for n, w in kept.items() if w == ISLAND),
        "activation_products": sum(w == PRODUCT for w in kept.values()),
        "nodes": len(kept),
        "node_op_types": sorted({n.op_type for n in proto.graph.node if n.name in kept}),
        "why": WHY,
    }


# ------------------------------------------------------------------------------------------ QDQ graph


def fold_weight_chains(proto: onnx.ModelProto) -> int:
    """Fold nodes of `FOLDABLE` whose inputs are all constant into initializers (in place).

    Returns:
      int: how many nodes were folded.
    """
    from onnx.reference import ReferenceEvaluator

    g = proto.graph
    consts = {i.name: i for i in g.initializer}
    folded, new = [], []
    for node in g.node:
        if node.op_type not in FOLDABLE or not all(i in consts for i in node.input if i):
            continue
        inputs = [onnx.helper.make_tensor_value_info(i, consts[i].data_type, None) for i in node.input if i]
        outputs = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
        single = onnx.helper.make_model(onnx.helper.make_graph([node], "fold", inputs, outputs),
                                        opset_imports=proto.opset_import)
        values = ReferenceEvaluator(single).run(None, {i: onnx.numpy_helper.to_array(consts[i]) for i in node.input if i})
        for name, value in zip(node.output, values):
            consts[name] = onnx.numpy_helper.from_array(np.asarray(value), name)
            new.append(consts[name])
        folded.append(node)
    for node in folded:
        g.node.remove(node)
    g.initializer.extend(new)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return len(folded)


def gemm_as_matmul(proto: onnx.ModelProto, kept: Sequence[str]) -> int:
    """Rewrite each plain Gemm with a constant weight (alpha = beta = 1, A not transposed) outside `kept` as
    MatMul (the weight transposed once, in the initializer) plus Add of the bias (in place, same function).

    Why: ONNX Runtime fuses a dequantized MatMul with a float output into MatMulIntegerToFloat, but leaves a
    Gemm whose output is not quantized as float Gemm, dequantizing its INT8 weight at every run (vit_b's
    decoder layers: DequantizeLinear took 16% of the INT8 graph's time).

    Returns:
      int: how many Gemm nodes were rewritten.
    """
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    keep = set(kept)
    done = 0
    for index, node in reversed(list(enumerate(g.node))):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.name in keep or len(node.input) < 2 or node.input[1] not in inits
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)):
            continue
        w = onnx.numpy_helper.to_array(inits[node.input[1]])
        weight = onnx.numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0) else w),
                                              f"{node.name}_weight")
        g.initializer.append(weight)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.name}_product" if bias else node.output[0]
        new = [onnx.helper.make_node("MatMul", [node.input[0], weight.name], [product], name=node.name)]
        if bias:
            new.append(onnx.helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias"))
        g.node.remove(node)
        for offset, n in enumerate(new):
            g.node.insert(index + offset, n)
        done += 1
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return done


class _Batches:
    """ONNX Runtime's CalibrationDataReader over an image array, in batches, with the range interface of
    its strided calibration (each range is calibrated and merged alone, so memory holds one batch's
    intermediate tensors, not the whole set's)."""

    def __init__(self, name: str, images: np.ndarray, batch: int) -> None:
        self.batches = [{name: np.ascontiguousarray(images[i:i + batch], dtype=np.float32)}
                        for i in range(0, len(images), batch)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.items = iter(self.batches[start_index:end_index])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self.items, None)


def reroute_float_consumers(proto: onnx.ModelProto, kept: Sequence[str]) -> int:
    """Give every consumer of a quantized activation that is not a quantized matrix op the original tensor back.

    ONNX Runtime's quantizer replaces a quantized tensor by its DequantizeLinear output for all of its
    consumers, so a LayerNorm or a residual Add reading the same tensor as a Conv would compute on
    rounded values. Only the quantized ops (`QUANTIZED_OPS` outside `kept`) should; Q/DQ pairs left
    without a consumer are removed.

    Returns:
      int: how many node inputs were rerouted.
    """
    g = proto.graph
    keep = set(kept)
    producer = {o: n for n in g.node for o in n.output}
    original = {}  # DequantizeLinear output -> the float tensor its QuantizeLinear read
    for dq in (n for n in g.node if n.op_type == "DequantizeLinear"):
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            original[dq.output[0]] = q.input[0]
    moved = 0
    for node in g.node:
        if node.op_type in QUANTIZED_OPS and node.name not in keep:
            continue
        for i, name in enumerate(node.input):
            if name in original and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                node.input[i] = original[name]
                moved += 1
    _drop_unused_qdq(g)
    return moved


def _drop_unused_qdq(g: Any) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads (repeated: a DQ's removal frees its Q)."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)


def quantize_qdq(src: PathLike, dst: PathLike, *, kept: Sequence[str], images: np.ndarray, batch: int) -> Dict[str, Any]:
    """Write the QDQ INT8 graph of the FP32 graph `src` to `dst` (atomically) with ONNX Runtime's `quantize_static`.

    Arguments:
      src: the FP32 ONNX graph.
      dst: the QDQ graph to write.
      kept: node names left in floating point.
      images: calibration images, float32 (n, 3, S, S).
      batch: calibration batch (within the graph's batch range).

    Returns:
      dict: what the manifest records (tool, format, folded weight chains, Q/DQ counts).

    Raises:
      QuantizeError: the quantizer failed, or the graph's I/O types changed.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(src))
    folded = fold_weight_chains(proto)
    gemms = gemm_as_matmul(proto, kept)
    name = proto.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="icmoe-int8-") as tmp:
        prepared = Path(tmp) / "folded.onnx"
        onnx.save_model(proto, str(prepared))
        out = Path(tmp) / "qdq.onnx"
        try:
            with _root_log_level(logging.ERROR):  # its advice to pre-process goes to the root logger
                quantize_static(
                    str(prepared), str(out), _Batches(name, images, batch), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=list(kept), calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "CalibStridedMinMax": 1},
                )
        except Exception as e:  # the quantizer raises whatever its steps raise
            raise QuantizeError(f"ONNX Runtime quantize_static failed: {type(e).__name__}: {_one_line(e)}") from e
        qdq = onnx.load(str(out))
    rerouted = reroute_float_consumers(qdq, kept)
    onnx.checker.check_model(qdq)
    with atomic_path(dst) as tmp_dst:
        onnx.save_model(qdq, str(tmp_dst))
    ops = [n.op_type for n in qdq.graph.node]
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 symmetric per output channel", "activations": "int8 symmetric per tensor (MinMax)",
            "biases": "fp32", "quantized_ops": list(QUANTIZED_OPS), "folded_weight_chains": folded,
            "gemm_as_matmul": gemms,
            "float_inputs_restored": rerouted,
            "quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear")}


# ------------------------------------------------------------------------------------------ OpenVINO IR


def openvino_names(ov_model: Any, proto: onnx.ModelProto, kept: Sequence[str]) -> List[str]:
    """The OpenVINO ops that make up the kept ONNX nodes (NNCF's ignored scope).

    OpenVINO's ONNX reader may turn one node into several ops (LayerNormalization: MVN, Multiply, Add)
    and names only the last; the tensor names survive. So each kept node's ops are found by walking
    back from the op that produces its output until the ops that produce its inputs.
    """
    producer = {}
    for op in ov_model.get_ordered_ops():
        for port in op.outputs():
            for name in port.get_names():
                producer[name] = op
    keep = set(kept)
    names = set()
    for node in (n for n in proto.graph.node if n.name in keep):
        stop = set(node.input)
        stack = [producer[o] for o in node.output if o in producer]
        while stack:
            op = stack.pop()
            name = op.get_friendly_name()
            if name in names or op.get_type_name() in ("Constant", "Parameter"):
                continue
            if any(t in stop for port in op.outputs() for t in port.get_names()):
                continue
            names.add(name)
            stack.extend(i.get_source_output().get_node() for i in op.inputs())
    return sorted(names)


@contextlib.contextmanager
def _root_log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    saved = root.level
    root.setLevel(max(level, saved))
    try:
        yield
    finally:
        root.setLevel(saved)


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """NNCF's log at warnings only; its progress bars hidden unless `progress`."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    if progress:
        yield
        return
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield


SMOOTH_QUANT_ALPHA = 0.95  # NNCF's default for the matrix products of transformers
# What happens to the products of two activations (attention scores, softmax-weighted sums):
# "auto" quantizes them and keeps them in floating point where the family's INT8 gates then fail on a trained
# model; "quantize" and "keep" decide without checking.
ATTENTION_MODES = ("auto", "quantize", "keep")


def quantize_openvino(src: PathLike, dst: PathLike, *, proto: onnx.ModelProto, kept: Sequence[str],
                      images: np.ndarray, progress: bool = False,
                      smooth_quant: float = SMOOTH_QUANT_ALPHA) -> Dict[str, Any]:
    """Write NNCF's INT8 OpenVINO IR of the FP32 graph `src` to `dst` (.xml, with its .bin beside it).

    NNCF's transformer recipe, as OpenVINO's own SAM recipe: the transformer model type (its patterns keep
    normalisations and softmax in floating point, symmetric activations into matrix products), the mixed
    preset, SmoothQuant on the matrix products (per-channel scales moved from activations into weights,
    alpha `smooth_quant`) and fast bias correction. Activation ranges are the calibration images' extremes
    (min/max), not NNCF's default mean of per-image extremes, which clips what lies outside them: on the
    quick start's trained tiny that flipped 1.7% of the parity set's mask pixels instead of 0.7% (the INT8
    gate is 1%).

    Arguments:
      src: the FP32 ONNX graph.
      dst: the IR's .xml path.
      proto: `src` loaded (without weights), for the kept nodes' tensors.
      kept: ONNX node names left in floating point.
      images: calibration images, float32 (n, 3, S, S).
      progress: show NNCF's progress bars.
      smooth_quant: SmoothQuant's alpha for matrix products (negative: off).

    Returns:
      dict: what the manifest records (tool, preset, model type, SmoothQuant, bias correction, ignored ops).

    Raises:
      QuantizeError: OpenVINO could not read the graph or NNCF failed.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    dst = Path(dst)
    try:
        # convert_model, not read_model: its transformations fold constant subgraphs, so a weight the ONNX
        # graph transposes reaches its MatMul as a constant, which NNCF quantizes (read_model left vit_b's
        # ViT projections in FP32: NNCF saw Transpose(constant) as an activation).
        model = ov.convert_model(str(src))
    except Exception as e:
        raise QuantizeError(f"{src}: OpenVINO cannot read it ({_one_line(e)})") from None
    ignored = openvino_names(model, proto, kept)
    data = nncf.Dataset([images[i:i + 1].astype(np.float32) for i in range(len(images))])
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=smooth_quant))
    try:
        with _quiet(progress):
            quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER,
                                      preset=nncf.QuantizationPreset.MIXED, subset_size=len(images),
                                      fast_bias_correction=True,
                                      ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                                      advanced_parameters=advanced)
    except Exception as e:  # NNCF raises from its many steps
        raise QuantizeError(f"NNCF quantization failed: {type(e).__name__}: {_one_line(e)}") from e
    tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}.xml")
    ov.save_model(quantized, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), dst.with_suffix(".bin"))
    os.replace(tmp, dst)
    ops = quantized.get_ordered_ops()
    fq = sum(op.get_type_name() == "FakeQuantize" for op in ops)
    return {"tool": "nncf.quantize", "nncf": nncf.__version__, "openvino": ov.get_version(), "preset": "mixed",
            "model_type": "transformer", "activation_ranges": "calibration min/max",
            "smooth_quant": {"matmul_alpha": smooth_quant} if smooth_quant >= 0 else False,
            "bias_correction": "fast", "ignored_openvino_ops": len(ignored), "fake_quantize": fq,
            "matmuls_int8": _int8_matmuls(ops)}


# Ops between a MatMul and what feeds it that move values or dequantize them (compressed weights are
# int8 Constant -> Convert -> Subtract -> Multiply; activations FakeQuantize, possibly behind a Transpose).
_PASS_THROUGH = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Convert", "Subtract", "Multiply")


def _int8_source(node: Any, depth: int = 5) -> bool:
    """Whether an input of a MatMul comes from a FakeQuantize or an 8-bit constant (through `_PASS_THROUGH`)."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Constant":
        return node.get_output_element_type(0).get_type_name() in ("i8", "u8")
    if kind not in _PASS_THROUGH or depth == 0:
        return False
    return any(_int8_source(i.get_source_output().get_node(), depth - 1) for i in node.inputs())


def _int8_matmuls(ops: Sequence[Any]) -> Dict[str, int]:
    """MatMuls of the IR whose two inputs are both 8-bit (INT8 kernels), and the others (floating point)."""
    counts = {"int8": 0, "float": 0}
    for op in (o for o in ops if o.get_type_name() == "MatMul"):
        both = all(_int8_source(i.get_source_output().get_node()) for i in op.inputs())
        counts["int8" if both else "float"] += 1
    return counts


# ------------------------------------------------------------------------------------------ the build step


def _check_gates(reference: Any, family: Family, candidate: Any, trained: bool, n: int) -> Dict[str, Any]:
    """The family's INT8 gates of `candidate` (an engine of the graph just written) against `reference` (the
    FP32 graph on ONNX Runtime), on `n` parity images (and as many held-out ones); skipped for a random-init
    model."""
    if not trained:
        return {"checked": False, "why": "random init: the INT8 gates need a trained model (its logits sit at zero)"}
    from export.verify import gate_check

    with reference, candidate:
        report = gate_check(family, reference, candidate, "int8", n=n)
    return {"checked": True, **report}


def _with_attention(make, check, attention: str, what: str) -> Dict[str, Any]:
    """Run `make(products_kept)` with the attention products quantized, check it, and make it again with them
    kept in floating point where the gates failed; returns the attention record."""
    if attention == "keep":
        make(True)
        return {"quantized": False, "why": "--int8-attention keep"}
    make(False)
    if attention == "quantize":
        return {"quantized": True, "why": "--int8-attention quantize (not checked)"}
    result = check()
    if not result["checked"] or result["passed"]:
        return {"quantized": True, "check": result}
    log.info(f"int8: {what} with the attention products quantized fails the INT8 gates "
             f"({_gate_summary(result)}); keeping them in floating point")
    make(True)
    return {"quantized": False, "check": result, "why": "the INT8 gates failed with them quantized"}


def _gate_summary(r: Dict[str, Any]) -> str:
    parts = [f"{k} {r[k]:.4g}" for k in ("max_abs_logit", "flipped", "min_dice", "min_class_dice", "agreement")
             if isinstance(r.get(k), float)]
    if (r.get("heldout") or {}).get("max_change") is not None:
        parts.append(f"held-out Dice change {r['heldout']['max_change']:.4f}")
    return ", ".join(parts)


def quantize_build(build_dir: PathLike, *, family: Family, inputs: Sequence[Any], outputs: Sequence[Any],
                   batch: Tuple[int, int], images: np.ndarray, calibration: Dict[str, Any],
                   class_names: Optional[Sequence[str]] = None, progress: bool = False, attention: str = "auto",
                   trained: bool = True, check_images: int = 16,
                   smooth_quant: float = SMOOTH_QUANT_ALPHA) -> Dict[str, Any]:
    """Make and register a build's INT8 artifacts from its `model.onnx` (see the module docstring).

    Arguments:
      build_dir: a build (staging) directory with model.onnx registered.
      family: the model family (what stays in floating point, the INT8 gates).
      inputs, outputs: the graph's tensor specs (their element types must survive).
      batch: the build's (smallest, largest) batch (ONNX Runtime calibrates in batches of up to 4 within it).
      class_names: the `mask` output's label names (None: binary), for the gate check's held-out Dice.
      images: calibration images, float32 (n, 3, S, S), RGB 0..255.
      calibration: where they came from (source, images, seed), for the manifest.
      progress: show NNCF's progress bars.
      attention: one of `ATTENTION_MODES` (the products of two activations in INT8 or floating point).
      trained: whether the weights are trained ("auto" checks the gates only then).
      check_images: parity images of that check.
      smooth_quant: SmoothQuant's alpha for NNCF (negative: off).

    Returns:
      dict: the manifest's `quantization` entry.

    Raises:
      QuantizeError: NNCF, OpenVINO or ONNX Runtime missing or failing, or a graph breaking the I/O contract.
    """
    why = int8_unavailable()
    if why:
        raise QuantizeError(why)
    if attention not in ATTENTION_MODES:
        raise QuantizeError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    from engines.onnxruntime import OnnxRuntimeEngine
    from engines.openvino import OpenVINOEngine

    build_dir = Path(build_dir)
    src = build_dir / ONNX_GRAPHS["fp32"]
    proto = onnx.load(str(src), load_external_data=False)
    try:
        kept = kept_fp32(proto, family)
    except IcmoeError as e:
        raise QuantizeError(f"{src}: {e}") from None
    base = [n for n, w in kept.items() if w != PRODUCT]
    specs = list(inputs) + list(outputs)
    info = {"inputs": list(inputs), "outputs": list(outputs), "batch_range": (int(batch[0]), int(batch[1]))}
    qdq, xml = build_dir / ONNX_GRAPHS["int8"], build_dir / OPENVINO_GRAPHS["int8"]
    made: Dict[str, Dict[str, Any]] = {}

    def make_qdq(keep_products: bool) -> None:
        made["qdq"] = quantize_qdq(src, qdq, kept=list(kept) if keep_products else base, images=images,
                                   batch=max(1, min(CALIBRATION_BATCH, int(batch[1]))))
        try:
            check_io_types(onnx.load(str(qdq), load_external_data=False), list(specs))
        except IcmoeError as e:
            raise QuantizeError(f"{ONNX_GRAPHS['int8']}: {e}") from None

    def make_ir(keep_products: bool) -> None:
        made["ir"] = quantize_openvino(src, xml, proto=proto, kept=list(kept) if keep_products else base,
                                       images=images, progress=progress, smooth_quant=smooth_quant)

    def check(engine: Any) -> Any:  # the gates of a graph just made, against the FP32 graph (both labelled)
        def run() -> Dict[str, Any]:
            reference, candidate = OnnxRuntimeEngine(path=src, **info), engine()
            reference.class_names = candidate.class_names = None if class_names is None else list(class_names)
            return _check_gates(reference, family, candidate, trained, check_images)
        return run
    att = {"onnxruntime": _with_attention(make_qdq, check(lambda: OnnxRuntimeEngine(path=qdq, precision="int8", **info)),
                                          attention, ONNX_GRAPHS["int8"]),
           "openvino": _with_attention(make_ir, check(lambda: OpenVINOEngine(path=xml, precision="int8", **info)),
                                       attention, xml.name)}
    add_artifact(build_dir, qdq.name, kind="onnx", precision="int8", attention_products_int8=att["onnxruntime"]["quantized"],
                 **made["qdq"])
    add_artifact(build_dir, xml.with_suffix(".bin").name, kind="openvino_ir_weights", precision="int8")
    add_artifact(build_dir, xml.name, kind="openvino_ir", precision="int8", files=[xml.with_suffix(".bin").name],
                 attention_products_int8=att["openvino"]["quantized"], **made["ir"])
    entry = {"calibration": calibration, "kept_fp32": kept_summary(proto, family, kept), "attention_mode": attention,
             "attention_products": att}
    manifest = read_manifest(build_dir)
    manifest["quantization"] = entry
    write_manifest(build_dir, manifest)
    log.info(f"int8: {qdq.name} ({made['qdq']['quantize_linear']} QuantizeLinear, attention products "
             f"{'INT8' if att['onnxruntime']['quantized'] else 'FP32'}) and {xml.name} ({made['ir']['fake_quantize']} "
             f"FakeQuantize, attention products {'INT8' if att['openvino']['quantized'] else 'FP32'})")
    return entry


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[-1][:300] if lines else type(e).__name__
