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
from typing import Any, Callable, Dict, Iterator, List, Sequence, Set, Tuple

import numpy as np
import onnx
import torch
from torch import nn

from icmoe.core.errors import FamilyError
from icmoe.core.parity import argmax_flips, as_compared, dice_per_class, error_bound, parity_figures
from icmoe.core.specs import BATCH, TensorSpec
from icmoe.data.calibration import slices_3d
from icmoe.data.synthetic_volumes import synthetic_slices
from icmoe.families.base import Family
from icmoe.families.contracts import GraphSpec, ParitySpec, PrecisionSpec, Tolerances
from icmoe.families.moesam.codes import organ_codes
from icmoe.families.moesam.config import CONFIGS, MoESAMConfig
from icmoe.families.moesam.feb import ExpertChoiceMoE
from icmoe.families.moesam.model import MoESAM, build_moesam
from icmoe.families.moesam.recipe import MoESAMTraining

# FP16's unit roundoff (2^-11) and the ~16 rounding stages in sequence before the logits (as IC-MoE's).
FP16_BOUND = 16 * 2.0 ** -11
BF16_BOUND = 16 * 2.0 ** -9  # BF16 keeps 8 bits of mantissa against FP16's 10
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

    def segment_codes(self, config: MoESAMConfig) -> List[Dict[str, Any]]:
        """The datasets' organs by class name (`codes.py`); other names get the generic code."""
        return organ_codes(config.labels)

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
        """The gates of docs/moesam.md ("Parity gates"), per precision, against eager FP32.

        Labels are argmaxes and the FEB's routing a top-k: both discrete choices, judged by the
        reference's own margins (`compare`); a label that differs with a clear margin fails (max_flipped 0).
        """
        if precision == "fp32":
            # The same arithmetic in another order: logits within 1e-3.
            return Tolerances(atol=1e-3, rtol=0.0, max_flipped=0.0)
        if precision == "fp16":
            # As IC-MoE's FP16 gates: u = 2^-11 per rounding, about 16 stages in sequence: 16u relative, and
            # 16u of the image's largest |logit| where logits cancel. The router stays FP32, but its inputs
            # carry that error: a token whose router logit lies within it of an expert's k-th may be
            # picked instead, and the engine is then judged against eager's output for that routing.
            return Tolerances(atol=1e-3, rtol=FP16_BOUND, scaled_atol=FP16_BOUND, max_flipped=0.0, min_class_dice=0.99)
        if precision == "bf16":
            # As FP16 with BF16's unit roundoff (2^-9 against 2^-11): a four times wider bound for the logits
            # and for the routing and label ties it excuses, so a class may lose four times FP16's Dice
            # allowance (0.99 -> 0.96); as for INT8, the held-out Dice per class must stay within 0.01 of FP32's.
            return Tolerances(atol=1e-3, rtol=BF16_BOUND, scaled_atol=BF16_BOUND, max_flipped=0.0, min_class_dice=0.96,
                              max_dice_change=0.01)
        if precision == "int8":
            # As IC-MoE's INT8 gates (icmoe/families/icmoe/family.py): half an INT8 step is 1/254 of a tensor's
            # calibrated range; about 16 quantized stages give 16/254 of the image's logit scale within
            # the calibrated ranges, 4x that for inputs unlike the calibration set (0.25). Labels and
            # routing: ties within that bound, as above; held-out Dice per class within 0.01 of FP32's.
            return Tolerances(atol=1e-3, rtol=0.0, scaled_atol=4 * 16 / 254, max_flipped=0.0, max_dice_change=0.01)
        raise FamilyError(f"MoE-SAM has no parity gates for precision {precision!r}")

    def columns(self) -> List[Tuple[str, str, str]]:
        return [("min class Dice", "min_class_dice", ".4f"), ("labels agree", "label_agreement", ".3%"),
                ("label ties", "tie_flips", "d"), ("clear label flips", "clear_flips", "d"),
                ("other routing", "routing_swapped", "d")]

    def choice_references(self, model: nn.Module, images: np.ndarray, batch_size: int,
                          gates: Sequence[Tolerances]) -> List[Dict[str, np.ndarray]]:
        """Per gate: eager's logits with every tied routing decision taken the other way, and how many of
        the image's experts had one (their k-th and (k+1)-th router logits within the gate's bound of each
        other, the bound applied to the router logits as to the output logits)."""
        device = next(model.parameters()).device
        logits: List[List[np.ndarray]] = [[] for _ in gates]
        ties: List[List[np.ndarray]] = [[] for _ in gates]
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                e0, feats = model.encode(torch.from_numpy(images[i:i + batch_size]).to(device))
                for g, gate in enumerate(gates):
                    with swapped_ties(model, gate, record=ties[g]):
                        logits[g].append(model.head(e0, feats).cpu().numpy())
        return [{"swapped_logits": np.concatenate(lg), "routing_ties": np.concatenate(t)} for lg, t in zip(logits, ties)]

    def compare(self, reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
                tolerances: Tolerances) -> Dict[str, Any]:
        """Logits within tolerance (where gated), labels and per-class Dice, against eager's output for the
        routing the engine is nearer to where the image has a routing tie (`choice_references`); a label
        that differs is a tie where the reference's margin between its class and the engine's lies within
        the two logits' bounds, else clear (at most `max_flipped` of the pixels)."""
        ref, cand = reference["logits"], candidate["logits"]
        logits, swapped = _nearer_routing(reference, cand)
        mask = np.where(swapped[:, None, None, None], logits.argmax(1)[:, None].astype(reference["mask"].dtype),
                        reference["mask"])
        report = parity_figures(logits, cand, mask, candidate["mask"], tolerances)
        labels = argmax_flips(logits, candidate["mask"], error_bound(logits, atol=tolerances.atol, rtol=tolerances.rtol,
                                                                     scaled_atol=tolerances.scaled_atol))
        labels.pop("tie")
        dice = dice_per_class(mask, candidate["mask"], ref.shape[1])
        present = [d for d in dice.values() if d is not None]
        report.update(**labels, label_agreement=1.0 - report["flipped"], class_dice={str(k): v for k, v in dice.items()},
                      min_class_dice=min(present) if present else None,
                      routing_tie_images=int((reference.get("routing_ties", np.zeros(len(ref))) > 0).sum()),
                      routing_swapped=int(swapped.sum()), as_compared=as_compared(reference, candidate))
        dice_ok = tolerances.min_class_dice is None or all(d >= tolerances.min_class_dice for d in present)
        clear = labels["clear_flips"] / max(candidate["mask"].size, 1)
        report["passed"] = bool((report["logits_within_tol"] or not tolerances.gate_logits)
                                and clear <= tolerances.max_flipped and dice_ok)
        return report


def _nearer_routing(reference: Dict[str, np.ndarray], cand: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The reference logits, with the tied-routing ones (`swapped_logits`) in their place for each image that
    has a routing tie and whose candidate logits are nearer to them (largest |difference|); and which."""
    ref = reference["logits"]
    if "swapped_logits" not in reference:
        return ref, np.zeros(len(ref), bool)
    other = reference["swapped_logits"]

    def worst(a: np.ndarray) -> np.ndarray:
        return np.abs(cand.astype(np.float64) - a).reshape(len(a), -1).max(1)

    swapped = (reference["routing_ties"] > 0) & (worst(other) < worst(ref))
    return np.where(swapped[:, None, None, None], other, ref), swapped


@contextlib.contextmanager
def swapped_ties(model: nn.Module, gate: Tolerances, record: List[np.ndarray]) -> Iterator[None]:
    """Inside: every expert-choice MoE of `model` takes, where its k-th and (k+1)-th router logits lie within
    the gate's bound of each other, the (k+1)-th token instead of the k-th (the routing an engine whose
    error crosses that gap makes); `record` gets the number of tied experts per image of each call."""
    moes = [m for m in model.modules() if isinstance(m, ExpertChoiceMoE)]
    for moe in moes:
        moe.route = _tie_swapping_route(moe, gate, record)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for moe in moes:
            del moe.route


def _tie_swapping_route(moe: ExpertChoiceMoE, gate: Tolerances, record: List[np.ndarray]) -> Callable:
    def route(x: torch.Tensor) -> tuple:
        logits = moe.gate(x).transpose(1, 2)  # (B, E, N), eval mode: no routing noise
        if moe.k >= logits.shape[-1]:  # every token picked: no decision to tie
            record.append(np.zeros(len(x), np.int64))
            return ExpertChoiceMoE.route(moe, x)
        values, index = logits.topk(moe.k + 1, dim=-1)  # (B, E, k+1)
        scale = logits.abs().flatten(1).amax(1).view(-1, 1)  # (B, 1): the image's largest |router logit|
        bound = 2 * (gate.atol + gate.scaled_atol * scale) + gate.rtol * (values[..., -2].abs() + values[..., -1].abs())
        tie = (values[..., -2] - values[..., -1]) <= bound  # (B, E)
        last = torch.where(tie, index[..., -1], index[..., -2]).unsqueeze(-1)
        index = torch.cat([index[..., :-2], last], dim=-1)  # (B, E, k)
        record.append(tie.sum(1).cpu().numpy())
        return logits.gather(-1, index).softmax(dim=-1), index

    return route


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
