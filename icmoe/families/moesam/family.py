"""MoE-SAM declared to the toolkit: what its graph is, how lower precisions treat it, how parity is judged,
its summary; its training is `recipe.py`. docs/moesam.md describes the method.

Graph contract (every engine, Triton model and C++ program):

    image  (B, 3, S, S) float32 RGB 0..255  ->  logits (B, C+1, S, S) float32  class 0 = background
                                                mask   (B, 1, S, S)   uint8    label map: argmax over C+1
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Dict, Iterator, List, Set, Tuple

import numpy as np
import onnx
import torch
from torch import nn

from icmoe.core.errors import FamilyError
from icmoe.core.parity import dice_per_class, flipped_report, logits_report
from icmoe.core.specs import BATCH, TensorSpec
from icmoe.data.calibration import slices_3d
from icmoe.data.synthetic_volumes import synthetic_slices
from icmoe.families.base import Family
from icmoe.families.contracts import GraphSpec, ParitySpec, PrecisionSpec, Tolerances
from icmoe.families.moesam.config import CONFIGS, MoESAMConfig
from icmoe.families.moesam.model import MoESAM, build_moesam
from icmoe.families.moesam.recipe import MoESAMTraining

# Queries per chunk of the FEB's token attention in exported graphs: an (heads, 512, N) score
# block is 50 MB at ViT-B 256 instead of the full 302 MB (see TokenAttention).
EXPORT_QUERY_CHUNK = 512


class SegmentGraph(nn.Module):
    """images -> (logits, mask): MoE-SAM's inference outputs as a tuple, for export."""

    def __init__(self, model: MoESAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.segment(image)  # (B, C+1, S, S) f32, (B, 1, S, S) u8


def dense_form(model: MoESAM) -> MoESAM:
    """The same weights with the dense (one-hot gate) MoE combine: the same function, no gather."""
    other = copy.deepcopy(model)
    other.feb.moe.form = "dense"
    return other


def routing_island(proto: onnx.ModelProto) -> List[str]:
    """Nodes kept FP32 in the FP16 graph: the router, the softmax over picked logits, the weighted
    combine into the residual stream, and the final argmax.

    From each TopK back to the router's MatMul (its logits input), and forward from TopK's values
    through Softmax and every Mul / ScatterElements / Add until the combine reaches the residual
    sum; plus every ArgMax.
    """
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers: Dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: Set[str] = {n.name for n in proto.graph.node if n.op_type == "ArgMax"}
    topks = [n for n in proto.graph.node if n.op_type == "TopK"]
    if not topks:
        raise FamilyError("expected TopK nodes (the MoE router) in the MoE-SAM graph, found none")
    for topk in topks:
        keep.add(topk.name)
        node = producer.get(topk.input[0])
        while node is not None and node.op_type in ("Transpose", "Add", "MatMul", "Gemm", "Reshape"):
            keep.add(node.name)  # the router: logits = X W_g + b_g, transposed to (B, E, N)
            if node.op_type in ("MatMul", "Gemm"):
                break
            node = producer.get(node.input[0])
        stack = list(consumers.get(topk.output[0], []))  # the picked values -> softmax -> weights
        while stack:
            n = stack.pop()
            if n.name in keep or n.op_type not in ("Softmax", "Gather", "Slice", "Unsqueeze", "Squeeze", "Mul",
                                                  "ScatterElements", "Add", "Reshape"):
                continue
            keep.add(n.name)
            if n.op_type != "Add":  # the residual sum ends the island
                stack.extend(c for o in n.output for c in consumers.get(o, []))
    return sorted(keep)


class MoESAMGraph(GraphSpec):
    def inputs(self, config: MoESAMConfig) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("image", "float32", (BATCH, 3, s, s),
                           "RGB in 0..255 (gray slices repeated), divided by 255 inside the graph")]

    def outputs(self, config: MoESAMConfig) -> List[TensorSpec]:
        s, c = config.image_size, config.num_classes
        return [
            TensorSpec("logits", "float32", (BATCH, c + 1, s, s), "class logits, channel 0 = background"),
            TensorSpec("mask", "uint8", (BATCH, 1, s, s), "label map: argmax over the C+1 channels"),
        ]

    def export_module(self, model: nn.Module) -> nn.Module:
        return SegmentGraph(model)

    def mask_rule(self, config: MoESAMConfig) -> str:
        return "argmax"  # label map = argmax over the C+1 class logits, ties to the lowest class

    def class_names(self, config: MoESAMConfig) -> List[str]:
        return list(config.labels)

    @contextlib.contextmanager
    def export_patches(self, model: nn.Module) -> Iterator[None]:
        """The FEB's token attention in query chunks while tracing (eager keeps the fused SDPA)."""
        attn = [m for m in model.modules() if hasattr(m, "query_chunk")]
        before = [m.query_chunk for m in attn]
        try:
            for m in attn:
                m.query_chunk = EXPORT_QUERY_CHUNK
            yield
        finally:
            for m, q in zip(attn, before):
                m.query_chunk = q


class MoESAMPrecision(PrecisionSpec):
    # SAM's LayerNorm2d (neck, FEB neck, LPEG, decoder) is ReduceMean/Pow/Sqrt: its reductions stay FP32.
    fp32_op_types = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "TopK", "ArgMax")
    fp32_aten_ops = ("aten.topk.default", "aten._softmax.default", "aten.scatter.src", "aten.argmax.default",
                     "aten.native_layer_norm.default")

    def fp32_nodes(self, proto: onnx.ModelProto) -> List[str]:
        return routing_island(proto)

    def calibration_images(self, source: Any, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        """Slices of a 3-D dataset's training volumes (ACDC, BTCV, MM-WHS, Synapse, synthetic3d)."""
        training = MoESAMTraining()
        return slices_3d(source, n, image_size=image_size, seed=seed, datasets=tuple(training.datasets()),
                         load_split=training.load_split)


class MoESAMParity(ParitySpec):
    def synthetic_inputs(self, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        """Slices of synthetic multi-organ volumes (textured blobs, MRI-like noise), RGB 0..255."""
        return synthetic_slices(n, image_size, seed)[0]

    def synthetic_validation(self, n: int, image_size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        images, labels = synthetic_slices(n, image_size, seed)
        return images.astype(np.float32), labels[:, None].astype(np.uint8)

    def tolerances(self, precision: str) -> Tolerances:
        """The gates of docs/moesam.md ("Parity gates"), per precision, against eager FP32."""
        if precision == "fp32":
            # The same arithmetic in another order: logits within 1e-3 and every label equal, except
            # where the reference's best two classes tie within 2e-3 (see `compare`).
            return Tolerances(atol=1e-3, rtol=0.0, max_flipped=0.0)
        if precision == "fp16":
            # A token whose router logit is within FP16 rounding of an expert's k-th may be picked
            # differently, which moves logits non-smoothly: the gate is on the labels.
            return Tolerances(atol=1e-3, rtol=0.0, max_flipped=0.01, min_class_dice=0.99, gate_logits=False)
        if precision == "bf16":
            # As FP16 (a token may route differently near a tie, so the gate is on the labels), with BF16's
            # four times larger rounding (2^-9 against 2^-11): the band of pixels whose best two classes are
            # within rounding of each other is four times wider, so a class may lose four times FP16's Dice
            # allowance (0.99 -> 0.96); flipped labels stay at FP16's 1%, and, as for INT8, the held-out Dice
            # per class must stay within 0.01 of FP32's (the quick start's trained tiny: 0.989, 0.17%).
            return Tolerances(atol=1e-3, rtol=0.0, max_flipped=0.01, min_class_dice=0.96, gate_logits=False,
                              max_dice_change=0.01)
        if precision == "int8":
            # As IC-MoE's INT8 gates (icmoe/families/icmoe/family.py): half an INT8 step is 1/254 of a tensor's
            # calibrated range; about 16 quantized stages give 16/254 of the image's logit scale within
            # the calibrated ranges, 4x that for inputs unlike the calibration set (0.25). Labels: at most
            # 1% flip (outside float ties); held-out Dice per class within 0.01 of FP32's.
            return Tolerances(atol=1e-3, rtol=0.0, scaled_atol=4 * 16 / 254, max_flipped=0.01,
                              max_dice_change=0.01)
        raise FamilyError(f"MoE-SAM has no parity gates for precision {precision!r}")

    def columns(self) -> List[Tuple[str, str, str]]:
        return [("min class Dice", "min_class_dice", ".4f"), ("labels agree", "label_agreement", ".3%")]

    def compare(self, reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
                tolerances: Tolerances) -> Dict[str, Any]:
        """Logits within tolerance (where gated), labels flipped at most `max_flipped`, per-class Dice."""
        ref, cand = reference["logits"], candidate["logits"]
        logits = logits_report(ref, cand, atol=tolerances.atol, rtol=tolerances.rtol,
                               scaled_atol=tolerances.scaled_atol)
        flips = flipped_report(reference["mask"], candidate["mask"])
        # With every logit within atol, two classes can only swap where the reference's margin
        # between its best two is within 2 atol: a tie at rounding, not a different answer.
        top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.concatenate([ref, ref], axis=1)
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * tolerances.atol  # (B, S, S)
        differ = reference["mask"][:, 0] != candidate["mask"][:, 0]
        flips["flipped_decisive"] = float((differ & decisive).mean()) if differ.size else 0.0
        dice = dice_per_class(reference["mask"], candidate["mask"], ref.shape[1])
        present = [d for d in dice.values() if d is not None]
        report = {
            "images": int(len(ref)),
            "max_abs_logit": logits.get("max_abs"),
            "mean_abs_logit": logits.get("mean_abs"),
            "logits_worst_ratio": logits.get("worst_ratio"),
            "logits_within_tol": logits["within"],
            **flips,
            "label_agreement": 1.0 - flips["flipped"],
            "class_dice": {str(k): v for k, v in dice.items()},
            "min_class_dice": min(present) if present else None,
            "tolerances": tolerances.to_dict(),
        }
        dice_ok = tolerances.min_class_dice is None or all(d >= tolerances.min_class_dice for d in present)
        flipped = flips["flipped_decisive"] if tolerances.gate_logits else flips["flipped"]
        report["passed"] = bool((logits["within"] or not tolerances.gate_logits)
                                and flipped <= tolerances.max_flipped and dice_ok)
        return report


def summarize(cfg: MoESAMConfig) -> Dict[str, Any]:
    """Parameters and FLOPs of one image (random weights), split encoder / FEB / decoder."""
    torch.manual_seed(0)
    model = build_moesam(cfg)
    params = _param_split(model)
    flops = _flop_split(model, cfg.image_size)
    return {"model": "moesam", "config": cfg.name, "image_size": cfg.image_size,
            "num_classes": cfg.num_classes, "tokens": cfg.tokens, "k": cfg.k, **params,
            **{f"gflops_{part}": v / 1e9 for part, v in flops.items()},
            **{f"gmacs_{part}": v / 2e9 for part, v in flops.items()}}

def format_summary(s: Dict[str, Any]) -> str:
    m = lambda n: f"{n / 1e6:8.2f} M"  # noqa: E731
    lines = [
        f"MoE-SAM {s['config']} at {s['image_size']}x{s['image_size']}, {s['num_classes']} classes, "
        f"{s['tokens']} routed tokens, k = {s['k']} per expert",
        f"  parameters, total                   {m(s['params_total'])}",
        f"  parameters, trainable               {m(s['params_trainable'])}"
        f"  (IoU head, {s['params_iou_head'] / 1e6:.2f} M, never trains: its output is unused)",
        f"  parameters, frozen (ViT, neck, SAM prompt encoder) {m(s['params_frozen'])}",
    ]
    for part in ("encoder", "feb", "decoder", "total"):
        lines.append(f"  GFLOPs {part:<8} (FLOP = 2 MACs)   {s['gflops_' + part]:8.2f}"
                     f"   ({s['gmacs_' + part]:.2f} GMACs)")
    return "\n".join(lines)


def _param_split(model: MoESAM) -> Dict[str, int]:
    iou = sum(p.numel() for n, p in model.named_parameters() if ".iou_prediction_head." in f".{n}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable - iou, "params_iou_head": iou,
            "params_frozen": total - trainable}


def _flop_split(model: MoESAM, size: int) -> Dict[str, int]:
    """FLOPs of one image (FLOP = 2 multiply-adds): encoder (ViT + adapters + neck), FEB, decoder (+ LPEG).

    The FEB's attention is counted on its matmul form (the flop counter does not see inside
    the fused CPU SDPA kernel). The adapted blocks run outside `ImageEncoderViT.forward`, so the
    encoder is the sum of its parts as the counter records them.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), MoESAMGraph().export_patches(model), counter:
        model(torch.rand(1, 3, size, size) * 255)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    leaf = re.compile(r"MoESAM\.(vit\.(patch_embed|neck|blocks\.\d+\.\w+)|adapters\.\d+\.\w+)$")
    encoder = sum(v for k, v in counts.items() if leaf.match(k))
    feb, total = counts.get("MoESAM.feb", 0), counts.get("Global", 0)
    return {"encoder": encoder, "feb": feb, "decoder": total - encoder - feb, "total": total}


FAMILY = Family(
    name="moesam",
    title="MoE-SAM",
    configs=CONFIGS,
    build=build_moesam,
    graph=MoESAMGraph(),
    precision=MoESAMPrecision(),
    parity=MoESAMParity(),
    training=MoESAMTraining(),
    variants={"dense": dense_form},
    summarize=summarize,
    format_summary=format_summary,
)
