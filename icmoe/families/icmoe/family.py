"""IC-MoE declared to the toolkit: what its graph is, how lower precisions treat it, how parity is judged,
its summary; its training is `recipe.py`. docs/icmoe.md describes the method.

Graph contract (every engine, Triton model and C++ program):

    image  (B, 3, S, S) float32 RGB 0..255  ->  logits (B, 1, S, S) float32   fused logits
                                                mask   (B, 1, S, S) uint8     logits > 0
                                                expert (B,)         int32     chosen candidate
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Set, Tuple

import numpy as np
import onnx
import torch
from torch import nn

from icmoe.core.codes import concept
from icmoe.core.errors import FamilyError
from icmoe.core.parity import as_compared, choice_flips, dice_per_image, error_bound, parity_figures
from icmoe.core.specs import BATCH, TensorSpec
from icmoe.data.calibration import images_2d
from icmoe.data.synthetic import synthetic_images
from icmoe.families.base import Family
from icmoe.families.contracts import GraphPass, GraphSpec, ParitySpec, PrecisionSpec, Tolerances
from icmoe.families.icmoe.config import CONFIGS, ICMoEConfig
from icmoe.families.icmoe.model import NaiveICMoE, build_icmoe
from icmoe.families.icmoe.recipe import ICMoETraining
from icmoe.families.icmoe.voting.reference import candidate_distances
from icmoe.sam.build import freeze_unused_heads

# Unit roundoff of FP16 (2^-11): the relative error of one rounding to half precision.
FP16_UNIT_ROUNDOFF = 2.0 ** -11
# Unit roundoff of BF16 (2^-9: 8 significant bits): four times FP16's.
BF16_UNIT_ROUNDOFF = 2.0 ** -9
# INT8, symmetric per tensor: the largest rounding error of one quantization, as a share of the tensor's range.
INT8_HALF_STEP = 1.0 / 254


class VoteGraph(nn.Module):
    """images -> (logits, mask, expert): IC-MoE's inference outputs as a tuple, for export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vote = self.model(image)  # Vote(logits (B,1,S,S) f32, mask (B,1,S,S) u8, expert (B,) i32)
        return vote.logits, vote.mask, vote.expert


def voting_island(proto: onnx.ModelProto) -> List[str]:
    """Names of the nodes that upsample the expert logits, vote and fuse (kept FP32).

    Arguments:
      proto: the FP32 IC-MoE graph.

    Returns:
      list[str]: the three logits `Resize` nodes and every node downstream of them.
    """
    consumers: Dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    starts = [n for n in proto.graph.node if n.op_type == "Resize"]
    if len(starts) != 3:
        raise FamilyError(f"expected 3 Resize nodes (one per expert's logits), found {len(starts)}")
    seen: Set[str] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        for o in n.output:
            stack.extend(consumers.get(o, []))
    return sorted(seen)


def _ppav_plugin_pass(src, dst, manifest: Dict[str, Any]) -> None:
    from icmoe.families.icmoe.voting.plugin import (
        make_plugin_graph,  # onnx-graphsurgeon: only for TensorRT builds
    )

    make_plugin_graph(src, dst, alpha=float(manifest["model"]["config"]["alpha"]))


def _register_ppav_plugin() -> None:
    from icmoe.families.icmoe.voting.plugin import register_plugin  # TensorRT

    register_plugin()


class ICMoEGraph(GraphSpec):
    def inputs(self, config: ICMoEConfig) -> List[TensorSpec]:
        s = config.image_size
        return [TensorSpec("image", "float32", (BATCH, 3, s, s), "RGB in 0..255, normalised inside the graph")]

    def outputs(self, config: ICMoEConfig) -> List[TensorSpec]:
        s = config.image_size
        return [
            TensorSpec("logits", "float32", (BATCH, 1, s, s), "fused logits z2 + alpha * z_chosen"),
            TensorSpec("mask", "uint8", (BATCH, 1, s, s), "logits > 0"),
            TensorSpec("expert", "int32", (BATCH,), "chosen candidate: 0 basic, 1 semantic, 2 fused"),
        ]

    def export_module(self, model: nn.Module) -> nn.Module:
        return VoteGraph(model)

    def segment_codes(self, config: ICMoEConfig) -> List[Dict[str, Any]]:
        """The binary mask is a lesion (skin lesions, breast tumours, glands): SNOMED CT's morphologically
        abnormal structure / lesion, as DICOM's CID 7150 / 7159 name them."""
        return [{"category": concept("49755003", "SCT", "Morphologically Abnormal Structure"),
                 "type": concept("52988006", "SCT", "Lesion")}]

    def mask_rule(self, config: ICMoEConfig) -> str:
        return "threshold"  # mask = fused logits > 0


class ICMoEPrecision(PrecisionSpec):
    # SAM's LayerNorm2d (neck and decoder) is ReduceMean/Pow/Sqrt: its reductions stay FP32 too.
    fp32_op_types = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")
    # torch-tensorrt: the voting and fusion stay FP32 as in the ONNX FP16 graph
    fp32_aten_ops = ("aten.argmin.default", "aten.gather.default", "aten.abs.default", "aten.sum.dim_IntList",
                     "aten.gt.Scalar", "aten.ge.Scalar", "aten.native_layer_norm.default", "aten._softmax.default")
    tensorrt_passes = (
        GraphPass(name="ppav_plugin", output="model.plugin.onnx", apply=_ppav_plugin_pass,
                  prepare=_register_ppav_plugin),
    )

    def fp32_nodes(self, proto: onnx.ModelProto) -> List[str]:
        return voting_island(proto)

    def calibration_images(self, source: Any, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        """A 2-D dataset's training images (ISIC, BUSI, GlaS, synthetic) or a plain image folder."""
        return images_2d(source, n, image_size=image_size, seed=seed)

    def prepare_eager(self, model: nn.Module, device: torch.device) -> None:
        if device.type == "cuda":
            from icmoe.families.icmoe.voting.op import (
                install,  # Triton: registers the fused kernel as an op
            )

            install(model)


def vote_gap_bound(candidates: np.ndarray, gate: Tolerances) -> np.ndarray:
    """How far a precision's error can shrink each gap between two candidates' PPAV distances.

    A candidate's distance counts the pixels where its mask (logit > 0) differs from the majority of
    the three masks. A logit within the gate's error bound of zero (`error_bound`) may change sign; every
    pixel where some candidate's may is tried with each such subset of signs changed (at most 8
    cases), and the largest shrinkage of d_c - d_r at that pixel is summed over the pixels.

    Arguments:
      candidates: the candidates' logits, (B, 3, 1, S, S).

    Returns:
      (B, 3, 3) float: entry [r, c] bounds how much d_c - d_r can shrink (0 on the diagonal).
    """
    b = len(candidates)
    masks = (candidates > 0).reshape(b, 3, -1)  # (B, 3, P)
    unsure = (np.abs(candidates) <= error_bound(candidates, atol=gate.atol, rtol=gate.rtol,
                                                scaled_atol=gate.scaled_atol)).reshape(b, 3, -1)

    def contributions(m: np.ndarray) -> np.ndarray:  # |mask - majority| per candidate and pixel
        majority = m.sum(1, keepdims=True) >= 2
        return (m != majority).astype(np.int8)

    before = contributions(masks)
    gap = before[:, None, :, :] - before[:, :, None, :]  # [b, r, c, p] = contribution of c - of r
    shrink = np.zeros_like(gap)
    for flips in range(1, 8):  # each non-empty subset of the three candidates changes sign where it may
        which = np.array([(flips >> j) & 1 for j in range(3)], bool)[None, :, None]
        after = contributions(masks ^ (unsure & which))
        shrink = np.maximum(shrink, gap - (after[:, None, :, :] - after[:, :, None, :]))
    return shrink.sum(-1, dtype=np.int64).astype(np.float64)


class ICMoEParity(ParitySpec):
    def synthetic_inputs(self, n: int, image_size: int, seed: int = 0) -> np.ndarray:
        return np.asarray(synthetic_images(n, image_size, seed)[0], dtype=np.float32)

    def synthetic_validation(self, n: int, image_size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        images, masks = synthetic_images(n, image_size, seed)
        return np.asarray(images, dtype=np.float32), np.asarray(masks, dtype=np.uint8)

    def tolerances(self, precision: str) -> Tolerances:
        """The gates of docs/icmoe.md ("Parity gates"), per precision, against eager FP32."""
        if precision == "fp32":
            # The same arithmetic in another order: float32 rounding, relative to the logits' size. A
            # pixel whose logit is within rounding of zero may still flip (vit_b: 1 in 10^6).
            return Tolerances(atol=1e-3, rtol=1e-4, max_flipped=1e-4)
        if precision == "fp16":
            # FP16 stores every weight and activation of the experts with relative error u = 2^-11;
            # through the ViT, neck and decoder (about 16 rounding stages in sequence) that adds up
            # to at most ~16u of relative error. Where logits cancel to near zero the same error is
            # absolute, at the scale of the image's logits: hence the scaled part of atol.
            tol = 16 * FP16_UNIT_ROUNDOFF  # 0.0078
            return Tolerances(atol=1e-5, rtol=tol, scaled_atol=tol, max_flipped=5e-3)
        if precision == "bf16":
            # The FP16 argument with BF16's unit roundoff (OpenVINO rounds the inputs of matrix products
            # and convolutions to BF16 and accumulates in FP32): 16 stages of 2^-9, 0.031 of the logits and
            # of the image's logit scale, the same bound deciding which vote flips are ties. Masks are held
            # to FP16's gate, and, as for INT8, the held-out Dice must stay within 0.01 of FP32's.
            tol = 16 * BF16_UNIT_ROUNDOFF  # 0.031
            return Tolerances(atol=1e-5, rtol=tol, scaled_atol=tol, max_flipped=5e-3, max_dice_change=0.01)
        if precision == "int8":
            # INT8 rounds each quantized tensor to half a step, 1/254 of its calibrated range; through
            # about 16 quantized stages in sequence that adds up to 16/254 = 0.063 of the image's logit
            # scale while activations stay within the ranges calibrated on real images. Images unlike
            # the calibration set (the parity set's uniform noise) leave those ranges and are clipped,
            # an error the step does not bound: 4x that, 0.25. Masks: at most 1% of pixels flip; the
            # chosen candidate may differ where two tie within that bound (`compare`); held-out Dice
            # per class within 0.01 of FP32's.
            tol = 4 * 16 * INT8_HALF_STEP  # 0.25
            return Tolerances(atol=1e-5, rtol=0.0, scaled_atol=tol, max_flipped=0.01, max_dice_change=0.01)
        raise FamilyError(f"IC-MoE has no parity gates for precision {precision!r}")

    def columns(self) -> List[Tuple[str, str, str]]:
        return [("min Dice", "min_dice", ".4f"), ("expert agrees", "agreement", ".0%"),
                ("vote ties", "tie_flips", "d"), ("clear vote flips", "clear_flips", "d")]

    def choice_references(self, model: nn.Module, images: np.ndarray, batch_size: int,
                          gates: Sequence[Tolerances]) -> List[Dict[str, np.ndarray]]:
        """Eager's fused logits for each of the three candidates the vote can choose ("choice_logits",
        (B, 3, 1, S, S)), their PPAV distances ("choice_distance", (B, 3)), and per gate how far the
        precision's error can move each gap between two distances ("choice_bound", (B, 3, 3): entry
        [r, c] bounds how much d_c - d_r can shrink; see `vote_gap_bound`)."""
        device = next(model.parameters()).device
        fused, distances = [], []
        bounds: List[List[np.ndarray]] = [[] for _ in gates]
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                (z0, z1, z2), _ = model.experts(torch.from_numpy(images[i:i + batch_size]).to(device))
                cand = torch.stack([z0, z1, (z0 + z1 + z2) / 3], dim=1)  # (B, 3, 1, S, S): what ppav gathers from
                fused.append((z2.unsqueeze(1) + model.alpha * cand).cpu().numpy())  # ppav's fusion, per candidate
                distances.append(candidate_distances(z0, z1, z2).cpu().numpy())
                for g, gate in enumerate(gates):
                    bounds[g].append(vote_gap_bound(cand.cpu().numpy(), gate))
        shared = {"choice_logits": np.concatenate(fused), "choice_distance": np.concatenate(distances)}
        return [{**shared, "choice_bound": np.concatenate(b)} for b in bounds]

    def compare(self, reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray],
                tolerances: Tolerances) -> Dict[str, Any]:
        """Logits within tolerance and mask pixels flipped at most `max_flipped`, both against eager's output
        for the candidate the engine chose where its choice is a tie (the reference's distance gap to it
        within `choice_bound`); a choice that differs with a clear gap fails. Without the per-choice
        reference (`choice_references`) every differing choice counts as clear."""
        ref_choice, cand_choice = reference["expert"].astype(np.int64), candidate["expert"].astype(np.int64)
        n = np.arange(len(ref_choice))
        if "choice_distance" in reference:
            dist = reference["choice_distance"]
            valid = (cand_choice >= 0) & (cand_choice < dist.shape[1])
            at = np.where(valid, cand_choice, 0)
            margin = np.where(valid, dist[n, at] - dist[n, ref_choice], np.inf)
            bound = reference["choice_bound"][n, ref_choice, at]
        else:
            margin, bound = np.full(len(n), np.inf), np.zeros(len(n))
        flips = choice_flips(ref_choice, cand_choice, margin, bound)
        logits, mask = reference["logits"].copy(), reference["mask"].copy()
        tie = flips.pop("tie")
        if tie.any():  # eager's output for the candidate the engine chose
            logits[tie] = reference["choice_logits"][n[tie], cand_choice[tie]]
            mask[tie] = (logits[tie] > 0).astype(mask.dtype)
        report = parity_figures(logits, candidate["logits"], mask, candidate["mask"], tolerances)
        dice = dice_per_image(mask, candidate["mask"])
        report.update(min_dice=float(dice.min()), mean_dice=float(dice.mean()),
                      agreement=float((ref_choice == cand_choice).mean()), **flips,
                      as_compared=as_compared(reference, candidate))
        report["passed"] = bool(report["logits_within_tol"] and report["flipped"] <= tolerances.max_flipped
                                and flips["clear_flips"] == 0)
        return report


def summarize(cfg: ICMoEConfig) -> Dict[str, Any]:
    """Parameters and FLOPs of one image (random weights); see `format_summary`."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    shared = build_icmoe(cfg)
    naive = NaiveICMoE.from_shared(shared)
    frozen_heads = freeze_unused_heads(shared)
    flops = {}
    for label, model in (("shared", shared), ("naive", naive)):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.rand(1, 3, cfg.image_size, cfg.image_size) * 255)
        flops[label] = counter.get_total_flops()
    return {
        "model": "icmoe",
        "config": cfg.name,
        "image_size": cfg.image_size,
        "params_total": _count(naive),
        "params_stored": _count(shared),
        "params_trainable": _count(shared, trainable_only=True),
        "params_frozen_heads": sum(p.numel() for n, p in shared.named_parameters() if n in frozen_heads),
        "gflops_shared": flops["shared"] / 1e9,
        "gflops_naive": flops["naive"] / 1e9,
        "gmacs_shared": flops["shared"] / 2e9,
        "gmacs_naive": flops["naive"] / 2e9,
    }

def format_summary(s: Dict[str, Any]) -> str:
    m = lambda n: f"{n / 1e6:8.2f} M"  # noqa: E731
    return "\n".join([
        f"IC-MoE {s['config']} at {s['image_size']}x{s['image_size']}",
        f"  parameters, total (3 experts)       {m(s['params_total'])}",
        f"  parameters, stored (shared)         {m(s['params_stored'])}",
        f"  parameters, trainable               {m(s['params_trainable'])}"
        f"  (IoU heads, {s['params_frozen_heads'] / 1e6:.2f} M, never train)",
        f"  GFLOPs, shared (FLOP = 2 MACs)      {s['gflops_shared']:8.2f}",
        f"  GFLOPs, naive  (FLOP = 2 MACs)      {s['gflops_naive']:8.2f}",
        f"  GMACs, shared  (the paper's unit)   {s['gmacs_shared']:8.2f}",
        f"  GMACs, naive   (the paper's unit)   {s['gmacs_naive']:8.2f}",
        f"  shared / naive                      {s['gflops_shared'] / s['gflops_naive']:8.3f}",
    ])


def _count(module: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (a tensor shared by several submodules counts once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


FAMILY = Family(
    name="icmoe",
    title="IC-MoE",
    configs=CONFIGS,
    build=build_icmoe,
    graph=ICMoEGraph(),
    precision=ICMoEPrecision(),
    parity=ICMoEParity(),
    training=ICMoETraining(),
    eager_name="shared",
    variants={"naive": NaiveICMoE.from_shared},
    summarize=summarize,
    format_summary=format_summary,
)
